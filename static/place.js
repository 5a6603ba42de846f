// Draws the result page's small dataset map and puts this film on it. The map is the
// same for every film: it is fetched as Bokeh JSON (cached by the browser) and embedded
// here; this film's position comes in data attributes and fills the empty "upload"
// source, so nothing of the upload is part of the plot the server sends.
(function () {
  const holder = document.getElementById("film-map");
  if (!holder || !window.Bokeh) return;
  const x = parseFloat(holder.dataset.x), y = parseFloat(holder.dataset.y);
  fetch(holder.dataset.src)
    .then(function (response) { return response.json(); })
    .then(function (item) { return window.Bokeh.embed.embed_item(item, "film-map-plot"); })
    .then(function () {
      let tries = 0;
      const timer = setInterval(function () {
        tries += 1;
        const doc = window.Bokeh.documents[window.Bokeh.documents.length - 1];
        const source = doc ? doc.get_model_by_name("upload") : null;
        if (source) {
          source.data = { x: [x], y: [y] };
          holder.dataset.placed = "true";
          clearInterval(timer);
        } else if (tries > 100) {
          clearInterval(timer);
        }
      }, 50);
    });
})();
