// Drag-and-drop onto the upload form; the plain file picker works without this script.
(function () {
  "use strict";
  var form = document.getElementById("upload-form");
  var zone = document.getElementById("dropzone");
  var input = document.getElementById("image");
  var label = document.getElementById("chosen-file");
  var button = document.getElementById("submit");
  if (!form || !zone || !input) { return; }

  function showChosen() {
    label.textContent = input.files.length ? input.files[0].name : "";
  }
  input.addEventListener("change", showChosen);
  ["dragenter", "dragover"].forEach(function (name) {
    zone.addEventListener(name, function (event) {
      event.preventDefault();
      zone.classList.add("dragging");
    });
  });
  ["dragleave", "drop"].forEach(function (name) {
    zone.addEventListener(name, function () { zone.classList.remove("dragging"); });
  });
  zone.addEventListener("drop", function (event) {
    event.preventDefault();
    if (event.dataTransfer && event.dataTransfer.files.length) {
      input.files = event.dataTransfer.files;
      showChosen();
    }
  });
  var idleText = button.textContent;
  form.addEventListener("submit", function () {
    button.disabled = true;
    button.textContent = "Analysing…";
  });
  // Back from a result restores this page as it was left (the back/forward cache): busy.
  window.addEventListener("pageshow", function () {
    button.disabled = false;
    button.textContent = idleText;
  });
})();
