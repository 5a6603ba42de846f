// Sortable tables: each heading of a .sortable table becomes a button that sorts by its
// column (again: the other way), and the heading says how the table is sorted (aria-sort).
// Without this script the table keeps the server's order and its headings are plain text.
(function () {
  "use strict";
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    var headers = Array.prototype.slice.call(table.querySelectorAll("thead th"));
    headers.forEach(function (header, column) {
      var button = document.createElement("button");
      button.type = "button";
      button.className = "sort";
      while (header.firstChild) { button.appendChild(header.firstChild); }
      header.appendChild(button);
      button.addEventListener("click", function () {
        var numeric = header.getAttribute("data-sort") === "number";
        // the first click on a column sorts numbers high to low and text A to Z
        var current = header.getAttribute("aria-sort");
        var descending = current ? current === "ascending" : numeric;
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[column], y = b.cells[column];
          var u = numeric ? parseFloat(x.getAttribute("data-value")) : x.textContent.trim();
          var v = numeric ? parseFloat(y.getAttribute("data-value")) : y.textContent.trim();
          var order = numeric ? u - v : u.localeCompare(v);
          return descending ? -order : order;
        });
        rows.forEach(function (row) { body.appendChild(row); });
        headers.forEach(function (other) { other.removeAttribute("aria-sort"); });
        header.setAttribute("aria-sort", descending ? "descending" : "ascending");
      });
    });
  });
})();
