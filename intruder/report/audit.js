(function () {
  "use strict";
  // Sortable, filterable per-layer table; no libraries, no network.
  function setup(table) {
    var tbody = table.tBodies[0];
    var rows = Array.prototype.slice.call(tbody.rows);
    var heads = table.tHead.rows[0].cells;
    var state = { col: -1, dir: 1 };
    function value(row, col, numeric) {
      var cell = row.cells[col];
      if (numeric) {
        var v = parseFloat(cell.getAttribute("data-v"));
        return isNaN(v) ? null : v;
      }
      return (cell.getAttribute("data-v") || cell.textContent).toLowerCase();
    }
    function sortBy(col) {
      var numeric = heads[col].getAttribute("data-type") === "num";
      state.dir = state.col === col ? -state.dir : (numeric ? -1 : 1);
      state.col = col;
      var keyed = rows.map(function (r, i) { return [value(r, col, numeric), i, r]; });
      keyed.sort(function (a, b) {
        var x = a[0], y = b[0];
        if (x === y) { return a[1] - b[1]; }
        if (x === null) { return 1; }  // missing values last in both directions
        if (y === null) { return -1; }
        return (x < y ? -1 : 1) * state.dir;
      });
      rows = keyed.map(function (k) { return k[2]; });
      rows.forEach(function (r) { tbody.appendChild(r); });
      for (var i = 0; i < heads.length; i++) {
        heads[i].setAttribute("aria-sort", i === col ? (state.dir > 0 ? "ascending" : "descending") : "none");
      }
    }
    Array.prototype.forEach.call(heads, function (th, i) {
      th.tabIndex = 0;
      th.addEventListener("click", function () { sortBy(i); });
      th.addEventListener("keydown", function (e) {
        if (e.key === "Enter" || e.key === " ") { e.preventDefault(); sortBy(i); }
      });
    });
    var id = table.id;
    var text = document.getElementById(id + "-filter");
    var status = document.getElementById(id + "-status");
    var only = document.getElementById(id + "-only");
    var shown = document.getElementById(id + "-shown");
    function apply() {
      var q = text ? text.value.trim().toLowerCase() : "";
      var terms = q ? q.split(/\s+/) : [];
      var st = status ? status.value : "";
      var n = 0;
      rows.forEach(function (r) {
        var name = (r.getAttribute("data-name") || "").toLowerCase();
        var ok = terms.every(function (t) { return name.indexOf(t) !== -1; });
        if (ok && st) { ok = r.getAttribute("data-status") === st; }
        if (ok && only && only.checked) { ok = r.getAttribute("data-flagged") === "1"; }
        r.hidden = !ok;
        if (ok) { n += 1; }
      });
      if (shown) { shown.textContent = String(n); }
    }
    [text, status, only].forEach(function (el) {
      if (el) { el.addEventListener("input", apply); el.addEventListener("change", apply); }
    });
    apply();
  }
  Array.prototype.forEach.call(document.querySelectorAll("table.sortable"), setup);
  document.documentElement.setAttribute("data-audit-js", "ready");
}());
