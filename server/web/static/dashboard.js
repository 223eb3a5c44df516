// EdgeGuide dashboard: draws the charts from each canvas's data-payload (JSON rendered by the server)
// and redraws them after htmx swaps a live region. No inline script anywhere (the CSP forbids it).
(function () {
  "use strict";

  function latencyChart(canvas, data) {
    var marks = data.marks || {};
    if (data.edges) {
      var labels = data.counts.map(function (_, i) { return data.edges[i].toPrecision(3) + "–" + data.edges[i + 1].toPrecision(3); });
      var title = "latency histogram (ms)" + (data.overflow ? " — " + data.overflow + " above the last bin not shown" : "");
      var marked = Object.keys(marks).filter(function (k) { return marks[k] !== null; })
        .map(function (k) { return k + " " + marks[k].toPrecision(3) + " ms"; }).join(", ");
      return new Chart(canvas, {
        type: "bar",
        data: { labels: labels, datasets: [{ label: "inferences", data: data.counts, backgroundColor: "#4477aa", barPercentage: 1.0, categoryPercentage: 1.0 }] },
        options: { animation: false, maintainAspectRatio: false,
          plugins: { title: { display: true, text: [title, marked] }, legend: { display: false } },
          scales: { x: { title: { display: true, text: "latency (ms)" } }, y: { title: { display: true, text: "inferences" } } } }
      });
    }
    var keys = Object.keys(data.percentiles);
    return new Chart(canvas, {
      type: "bar",
      data: { labels: keys, datasets: [{ label: "latency (ms)", data: keys.map(function (k) { return data.percentiles[k]; }), backgroundColor: "#4477aa" }] },
      options: { animation: false, maintainAspectRatio: false, plugins: { title: { display: true, text: "latency percentiles (ms)" } } }
    });
  }

  function paretoChart(canvas, s) {
    function pts(rows) { return rows.map(function (r) { return { x: r.kib, y: r.ndcg10, name: r.name }; }); }
    var front = s.variants.filter(function (v) { return v.front; });
    var others = s.variants.filter(function (v) { return !v.front; });
    var xs = s.variants.map(function (v) { return v.kib; }).concat([s.reference.kib]);
    var minX = Math.min.apply(null, xs) / 2, maxX = Math.max.apply(null, xs) * 2;
    var datasets = [
      { label: "size/NDCG frontier", data: pts(s.frontier), showLine: true, stepped: "after", borderColor: "rgba(47,91,211,0.45)", backgroundColor: "rgba(47,91,211,0.45)", pointRadius: 0 },
      { label: "Pareto set (search)", data: pts(front), backgroundColor: "#2f5bd3", pointRadius: 5 },
      { label: "other variants", data: pts(others), backgroundColor: "#98a2b3", pointRadius: 4 },
      { label: "float32 reference", data: pts([s.reference]), backgroundColor: "#c4320a", pointStyle: "star", pointRadius: 12, borderColor: "#c4320a" }
    ];
    if (s.best) { datasets.push({ label: "best: " + s.best.name, data: pts([s.best]), pointStyle: "circle", pointRadius: 10, backgroundColor: "rgba(0,0,0,0)", borderColor: "#18794e", borderWidth: 2 }); }
    var sized = s.baselines.filter(function (b) { return b.kib; });
    if (sized.length) { datasets.push({ label: "baselines at device size", data: pts(sized), pointStyle: "rect", pointRadius: 7, backgroundColor: "#f79009" }); }
    s.baselines.filter(function (b) { return !b.kib; }).forEach(function (b, i) {
      var colors = ["#6172f3", "#9e77ed", "#b54708", "#667085"];
      datasets.push({ label: "baseline " + b.name, data: [{ x: minX, y: b.ndcg10, name: b.name }, { x: maxX, y: b.ndcg10, name: b.name }],
        showLine: true, borderDash: [6, 4], borderWidth: 1, pointRadius: 0, borderColor: colors[i % colors.length], backgroundColor: colors[i % colors.length] });
    });
    if (s.floor_ndcg) {
      datasets.push({ label: "quality floor", data: [{ x: minX, y: s.floor_ndcg }, { x: maxX, y: s.floor_ndcg }], showLine: true,
        borderDash: [2, 3], borderWidth: 1, pointRadius: 0, borderColor: "#c4320a" });
    }
    return new Chart(canvas, {
      type: "scatter", data: { datasets: datasets },
      options: { animation: false, maintainAspectRatio: false,
        plugins: { title: { display: true, text: "size vs NDCG@10 (" + s.run + ")" },
          tooltip: { callbacks: { label: function (c) { return (c.raw.name || c.dataset.label) + ": " + c.raw.x.toFixed(1) + " KiB, NDCG@10 " + c.raw.y.toFixed(4); } } } },
        scales: { x: { type: "logarithmic", min: minX, max: maxX, title: { display: true, text: ".tflite size (KiB, log scale)" } },
          y: { title: { display: true, text: "NDCG@10 (test)" } } } }
    });
  }

  var builders = { latency: latencyChart, pareto: paretoChart };

  function drawCharts(root) {
    if (typeof Chart === "undefined") { return; }
    root.querySelectorAll("canvas[data-chart]").forEach(function (canvas) {
      if (canvas.dataset.drawn) { return; }
      try {
        builders[canvas.dataset.chart](canvas, JSON.parse(canvas.dataset.payload));
        canvas.dataset.drawn = "1";
      } catch (err) {
        canvas.dataset.drawn = "error";
        console.error("chart", canvas.id || canvas.className, err);
      }
    });
    root.querySelectorAll(".bar .fill[data-pct]").forEach(function (bar) {
      bar.style.width = Math.min(100, parseFloat(bar.dataset.pct) || 0) + "%";
    });
  }

  document.addEventListener("DOMContentLoaded", function () { drawCharts(document); });
  document.addEventListener("htmx:afterSettle", function (evt) { drawCharts(document); });
})();
