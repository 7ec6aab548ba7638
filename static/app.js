// The live job page: metric points and status arrive over Server-Sent Events and feed two uPlot charts.
// EventSource reconnects by itself and sends Last-Event-ID, so the server resumes after the last point we saw;
// on a fresh page load the stream replays every point from the start, so no separate history request is needed.
(function () {
  "use strict";

  var TERMINAL = ["succeeded", "failed", "cancelled"];
  var COLORS = { train: "#2563eb", eval: "#dc2626", accuracy: "#059669", f1: "#d97706" };

  function formatDuration(seconds) {
    if (seconds === null || seconds === undefined || !isFinite(seconds)) return "—";
    var total = Math.max(0, Math.round(seconds));
    var h = Math.floor(total / 3600), m = Math.floor((total % 3600) / 60), s = total % 60;
    if (h) return h + "h " + String(m).padStart(2, "0") + "m";
    return m ? m + "m " + String(s).padStart(2, "0") + "s" : s + "s";
  }

  function formatNumber(value) {
    if (value === null || value === undefined) return "—";
    if (Number.isInteger(value)) return value.toLocaleString("en");
    if (Math.abs(value) >= 100) return value.toFixed(1);
    return Math.abs(value) < 1e-3 ? value.toExponential(2) : value.toPrecision(4);
  }

  function makeChart(element, yLabel, series, range) {
    var opts = {
      width: Math.max(280, element.clientWidth),
      height: 260,
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false }, y: range ? { range: range } : { auto: true } },
      axes: [{ label: "step" }, { label: yLabel }],
      series: [{ label: "step" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, spanGaps: true, points: { show: s.points, size: 6 } };
      })),
    };
    var data = [[]].concat(series.map(function () { return []; }));
    return new uPlot(opts, data, element);
  }

  function JobPage(root) {
    this.root = root;
    this.jobId = root.dataset.jobId;
    this.status = root.dataset.status;
    this.seen = new Set();
    this.byStep = new Map(); // step -> {trainLoss, evalLoss, accuracy, f1}
    this.redrawPending = false;
    this.lossChart = makeChart(document.getElementById("chart-loss"), "loss", [
      { label: "train loss", color: COLORS.train, points: false },
      { label: "eval loss", color: COLORS.eval, points: true },
    ]);
    this.evalChart = makeChart(document.getElementById("chart-eval"), "score", [
      { label: "accuracy", color: COLORS.accuracy, points: true },
      { label: "F1 (macro)", color: COLORS.f1, points: true },
    ], [0, 1]);
    window.addEventListener("resize", this.resize.bind(this));
    this.connect();
  }

  JobPage.prototype.resize = function () {
    [["chart-loss", this.lossChart], ["chart-eval", this.evalChart]].forEach(function (pair) {
      pair[1].setSize({ width: Math.max(280, document.getElementById(pair[0]).clientWidth), height: 260 });
    });
  };

  JobPage.prototype.connect = function () {
    var self = this;
    var source = new EventSource("/api/v1/jobs/" + this.jobId + "/stream");
    source.addEventListener("metric", function (event) { self.onMetric(JSON.parse(event.data)); });
    source.addEventListener("status", function (event) { self.onStatus(JSON.parse(event.data)); });
    source.addEventListener("end", function (event) {
      source.close(); // the job is over and every point was sent; do not let EventSource reconnect
      self.onStatus(JSON.parse(event.data));
      self.root.dataset.streamEnded = "true";
    });
    this.source = source;
  };

  JobPage.prototype.onMetric = function (point) {
    if (this.seen.has(point.id)) return;
    this.seen.add(point.id);
    var row = this.byStep.get(point.step) || {};
    var values = point.values || {};
    if (point.split === "eval") {
      if ("loss" in values) row.evalLoss = values.loss;
      if ("accuracy" in values) row.accuracy = values.accuracy;
      if ("f1_macro" in values) row.f1 = values.f1_macro;
    } else if ("loss" in values) {
      row.trainLoss = values.loss;
    }
    this.byStep.set(point.step, row);
    var count = this.seen.size;
    this.root.dataset.points = String(count);
    document.getElementById("job-points").textContent = String(count);
    this.showLatest(point);
    this.scheduleRedraw();
  };

  JobPage.prototype.showLatest = function (point) {
    var values = point.values || {};
    Object.keys(values).forEach(function (key) {
      var cell = document.querySelector('[data-metric="' + point.split + "." + key + '"]');
      if (cell) cell.textContent = formatNumber(values[key]);
    });
    if (point.epoch !== null && point.epoch !== undefined) {
      document.querySelector('[data-metric="epoch"]').textContent = point.epoch.toFixed(2);
    }
  };

  JobPage.prototype.scheduleRedraw = function () {
    if (this.redrawPending) return;
    this.redrawPending = true;
    var self = this;
    // A timer rather than requestAnimationFrame: it also runs in background tabs, so the chart is current on return.
    setTimeout(function () { self.redrawPending = false; self.redraw(); }, 100);
  };

  JobPage.prototype.redraw = function () {
    var steps = Array.from(this.byStep.keys()).sort(function (a, b) { return a - b; });
    var rows = steps.map(function (step) { return this.byStep.get(step); }, this);
    function column(key) { return rows.map(function (r) { return r[key] === undefined ? null : r[key]; }); }
    this.lossChart.setData([steps, column("trainLoss"), column("evalLoss")]);
    var evalSteps = steps.filter(function (_, i) { return rows[i].accuracy !== undefined || rows[i].f1 !== undefined; });
    var evalRows = evalSteps.map(function (step) { return this.byStep.get(step); }, this);
    this.evalChart.setData([
      evalSteps,
      evalRows.map(function (r) { return r.accuracy === undefined ? null : r.accuracy; }),
      evalRows.map(function (r) { return r.f1 === undefined ? null : r.f1; }),
    ]);
  };

  JobPage.prototype.onStatus = function (snapshot) {
    var badge = document.getElementById("job-status");
    var changed = snapshot.status !== this.status;
    this.status = snapshot.status;
    this.root.dataset.status = snapshot.status;
    badge.textContent = snapshot.status;
    badge.className = "badge badge-" + snapshot.status;

    var percent = Math.round((snapshot.progress || 0) * 1000) / 10;
    var progress = document.getElementById("job-progress");
    progress.setAttribute("aria-valuenow", String(Math.round(percent)));
    progress.querySelector(".progress-bar").style.width = percent + "%";
    document.getElementById("job-progress-text").textContent = Math.round(percent) + "%";
    document.getElementById("job-step").textContent =
      "step " + (snapshot.step || 0) + (snapshot.total_steps ? " / " + snapshot.total_steps : "");
    var terminal = TERMINAL.indexOf(snapshot.status) >= 0;
    var eta = document.getElementById("job-eta");
    if (snapshot.status === "running") eta.textContent = "ETA " + formatDuration(snapshot.eta_seconds);
    else if (terminal) eta.textContent = "finished";

    var error = document.getElementById("job-error");
    error.hidden = !snapshot.error;
    error.textContent = snapshot.error || "";
    document.getElementById("cancel-button").hidden = terminal;
    if (snapshot.adapter_id) {
      var link = document.getElementById("adapter-link");
      link.href = "/adapters/" + snapshot.adapter_id;
      link.hidden = false;
      var download = document.getElementById("adapter-download");
      download.href = "/api/v1/adapters/" + snapshot.adapter_id + "/download";
      download.hidden = false;
    }
    if (changed || terminal) document.body.dispatchEvent(new CustomEvent("job-status", { detail: snapshot }));
  };

  // The job form: settings of a task-specific section (e.g. causal_lm) show only while that task is chosen.
  function syncTaskSections() {
    var task = document.getElementById("f-task");
    if (!task) return;
    document.querySelectorAll("[data-only-for-task]").forEach(function (section) {
      section.hidden = section.dataset.onlyForTask !== task.value;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("job-live");
    if (root && window.uPlot) window.jobPage = new JobPage(root);
    var task = document.getElementById("f-task");
    if (task) {
      task.addEventListener("change", syncTaskSections);
      syncTaskSections();
    }
  });
})();
