// Click a heading of a .sortable table to sort by that column; click again to reverse.
(function () {
  "use strict";
  document.querySelectorAll("table.sortable").forEach(function (table) {
    var body = table.tBodies[0];
    table.querySelectorAll("th").forEach(function (header, column) {
      var descending = false;  // the server already sent the table most-suspicious-first
      header.classList.add("clickable");
      header.addEventListener("click", function () {
        var numeric = header.getAttribute("data-sort") === "number";
        var rows = Array.prototype.slice.call(body.rows);
        rows.sort(function (a, b) {
          var x = a.cells[column], y = b.cells[column];
          var u = numeric ? parseFloat(x.getAttribute("data-value")) : x.textContent.trim();
          var v = numeric ? parseFloat(y.getAttribute("data-value")) : y.textContent.trim();
          var order = numeric ? u - v : u.localeCompare(v);
          return descending ? -order : order;
        });
        descending = !descending;
        rows.forEach(function (row) { body.appendChild(row); });
      });
    });
  });
})();
