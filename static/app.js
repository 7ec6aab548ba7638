// The live job page: metric points and status arrive over Server-Sent Events and feed two uPlot charts.
// EventSource reconnects by itself and sends Last-Event-ID, so the server resumes after the last point we saw;
// on a fresh page load the stream replays every point from the start, so no separate history request is needed.
(function () {
  "use strict";

  var TERMINAL = ["succeeded", "failed", "cancelled"];

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

  var PALETTE = ["#2563eb", "#dc2626", "#059669", "#d97706", "#7c3aed", "#0891b2", "#db2777", "#65a30d",
                 "#9333ea", "#ea580c", "#0f766e", "#4b5563"];

  // Axis ticks people can read. Learning rates in scientific notation ("1e-3", never "0.001, 0, 0, 0"); other
  // values with just enough decimals that neighbouring ticks differ ("0.6935, 0.694" rather than "0.694, 0.694").
  function scientific(value, digits) {
    if (value === 0) return "0";
    return value.toExponential(digits).replace(/\.?0+e/, "e").replace("e+", "e");
  }

  function distinct(labels) { return new Set(labels).size === labels.length; }

  function tickLabels(splits, useScientific) {
    var finite = splits.filter(function (v) { return v !== null && isFinite(v); });
    if (!finite.length) return splits.map(String);
    var largest = Math.max.apply(null, finite.map(Math.abs));
    if (useScientific || (largest > 0 && largest < 1e-3)) {
      for (var digits = 0; digits < 6; digits++) {
        var sci = splits.map(function (v) { return scientific(v, digits); });
        if (distinct(sci)) return sci;
      }
      return splits.map(function (v) { return scientific(v, 6); });
    }
    var gap = Infinity;
    for (var i = 1; i < finite.length; i++) gap = Math.min(gap, Math.abs(finite[i] - finite[i - 1]));
    var decimals = isFinite(gap) && gap > 0 ? Math.max(0, Math.ceil(-Math.log10(gap))) : 0;
    // Enough decimals that every tick is shown as it is (0.25, not 0.3) and no two read the same.
    var tolerance = (isFinite(gap) && gap > 0 ? gap : largest || 1) * 1e-6;
    for (; decimals < 10; decimals++) {
      var fixed = splits.map(function (v) {
        return largest >= 1e4 && decimals === 0 ? Math.round(v).toLocaleString("en") : v.toFixed(decimals);
      });
      var exact = splits.every(function (v) { return Math.abs(Number(v.toFixed(decimals)) - v) <= tolerance; });
      if (exact && distinct(fixed)) return fixed;
    }
    return splits.map(String);
  }

  // The step axis runs from 0 to the job's last step (data-total-steps), not to uPlot's rounded-up guess: a lone
  // eval point at step 29 would otherwise stretch the axis to 55.
  function stepRange(options) {
    return function (u, min, max) {
      var totalSteps = options.totalSteps;
      if (min === null || max === null || !isFinite(min) || !isFinite(max)) return [0, totalSteps || 1];
      var high = Math.max(max, totalSteps || 0);
      return [Math.min(0, min), high > 0 ? high : 1];
    };
  }

  function makeChart(element, yLabel, series, range, height, options) {
    options = options || {};
    var useScientific = Boolean(options.scientific);
    var opts = {
      width: Math.max(280, element.clientWidth),
      height: height || 260,
      legend: { live: true },
      cursor: { drag: { x: true, y: false } },
      scales: { x: { time: false, range: stepRange(options) },
                y: range ? { range: range } : { auto: true } },
      axes: [
        { label: "step", values: function (u, splits) { return tickLabels(splits, false); } },
        { label: yLabel, size: 60, values: function (u, splits) { return tickLabels(splits, useScientific); } },
      ],
      series: [{ label: "step" }].concat(series.map(function (s) {
        return { label: s.label, stroke: s.color, width: 2, spanGaps: true, points: { show: s.points, size: 6 },
                 value: function (u, v) { return v === null ? "—" : useScientific ? scientific(v, 3) : formatNumber(v); } };
      })),
    };
    var data = [[]].concat(series.map(function () { return []; }));
    return new uPlot(opts, data, element);
  }

  // Aligns several (x, y) series on the union of their x values, as uPlot wants: [xs, ys1, ys2, ...] with nulls.
  function align(tables) {
    var xs = new Set();
    tables.forEach(function (t) { t.x.forEach(function (x) { xs.add(x); }); });
    var sorted = Array.from(xs).sort(function (a, b) { return a - b; });
    var index = new Map(sorted.map(function (x, i) { return [x, i]; }));
    var out = [sorted];
    tables.forEach(function (t) {
      var ys = new Array(sorted.length).fill(null);
      for (var i = 0; i < t.x.length; i++) ys[index.get(t.x[i])] = t.y[i];
      out.push(ys);
    });
    return out;
  }

  function getJSON(url) {
    return fetch(url, { headers: { Accept: "application/json" }, credentials: "same-origin" }).then(function (r) {
      if (!r.ok) throw new Error(url + " answered " + r.status);
      return r.json();
    });
  }

  // The live job page. History comes downsampled from /series (a run of a million points loads as ~2000 per
  // curve); new points then arrive over SSE, starting after the history's cursor, so nothing is counted twice.
  function JobPage(root) {
    this.root = root;
    this.jobId = root.dataset.jobId;
    this.status = root.dataset.status;
    this.seen = new Set();
    this.points = 0;
    this.data = {}; // series key ("train.loss") -> {x: [steps], y: [values]}
    this.redrawPending = false;
    this.charts = [];
    this.step = 0;
    var self = this;
    // Before its first step a running job may be downloading its base model (its status does not change
    // meanwhile): its events, which say how far the download got, refresh every 2 s until then.
    this.startingTimer = window.setInterval(function () {
      if (self.status === "running" && !self.step) document.body.dispatchEvent(new CustomEvent("job-starting"));
      else if (self.status !== "queued" && self.status !== "running") window.clearInterval(self.startingTimer);
    }, 2000);
    document.querySelectorAll("[data-chart]").forEach(function (card) {
      var element = card.querySelector(".chart");
      var keys = element.dataset.series.split(",");
      var labels = element.dataset.labels.split(",");
      var range = element.dataset.range ? element.dataset.range.split(",").map(Number) : null;
      var series = keys.map(function (key, i) {
        return { label: labels[i] || key, color: PALETTE[i % PALETTE.length], points: key.indexOf("eval.") === 0 };
      });
      var options = { totalSteps: Number(root.dataset.totalSteps) || 0,
                      scientific: keys.some(function (key) { return key.indexOf("learning_rate") >= 0; }) };
      self.charts.push({ card: card, element: element, keys: keys, options: options,
                         plot: makeChart(element, labels.length === 1 ? labels[0] : card.dataset.chart, series, range,
                                         null, options) });
    });
    window.addEventListener("resize", this.resize.bind(this));
    getJSON("/api/v1/jobs/" + this.jobId + "/series?max_points=2000")
      .then(function (body) { self.loadHistory(body); return body.cursor; })
      .catch(function () { return 0; })
      .then(function (cursor) { self.connect(cursor); });
  }

  JobPage.prototype.resize = function () {
    this.charts.forEach(function (chart) {
      if (chart.card.hidden) return;
      chart.plot.setSize({ width: Math.max(280, chart.element.clientWidth), height: 260 });
    });
  };

  JobPage.prototype.loadHistory = function (body) {
    var self = this;
    Object.keys(body.series).forEach(function (key) {
      self.data[key] = { x: body.series[key].x.slice(), y: body.series[key].y.slice() };
      var ys = body.series[key].y;
      var xs = body.series[key].x;
      if (ys.length) self.setLatest(key, ys[ys.length - 1], xs[xs.length - 1]);
    });
    this.points = body.points || 0;
    this.showCount();
    this.scheduleRedraw();
  };

  JobPage.prototype.connect = function (cursor) {
    var self = this;
    var source = new EventSource("/api/v1/jobs/" + this.jobId + "/stream?after=" + (cursor || 0));
    source.addEventListener("metric", function (event) { self.onMetric(JSON.parse(event.data)); });
    source.addEventListener("status", function (event) { self.onStatus(JSON.parse(event.data)); });
    // A resumed run replaced the points logged after its checkpoint: drop them, the new run's points follow.
    source.addEventListener("reset", function (event) { self.onReset(JSON.parse(event.data)); });
    source.addEventListener("end", function (event) {
      source.close(); // the job is over and every point was sent; do not let EventSource reconnect
      self.onStatus(JSON.parse(event.data));
      self.root.dataset.streamEnded = "true";
    });
    this.source = source;
  };

  JobPage.prototype.showCount = function () {
    this.root.dataset.points = String(this.points);
    document.getElementById("job-points").textContent = String(this.points);
  };

  // ``reset`` {step, attempt, points}: every point after ``step`` was deleted by a resume (point ids are never
  // reused, so ``seen`` stays valid); drop them from every series, count the ``points`` that remain, go on.
  JobPage.prototype.onReset = function (reset) {
    var self = this;
    Object.keys(this.data).forEach(function (key) {
      var series = self.data[key];
      var keep = series.x.map(function (x) { return x <= reset.step; });
      series.x = series.x.filter(function (_, i) { return keep[i]; });
      series.y = series.y.filter(function (_, i) { return keep[i]; });
      if (series.y.length) self.setLatest(key, series.y[series.y.length - 1], series.x[series.x.length - 1]);
    });
    this.points = reset.points;
    this.root.dataset.resets = String(Number(this.root.dataset.resets || 0) + 1);
    this.root.dataset.resetStep = String(reset.step);
    this.showCount();
    this.scheduleRedraw();
  };

  JobPage.prototype.onMetric = function (point) {
    if (this.seen.has(point.id)) return;
    this.seen.add(point.id);
    var values = point.values || {};
    var self = this;
    Object.keys(values).forEach(function (name) {
      var value = values[name];
      if (typeof value !== "number" || !isFinite(value)) return;
      var key = point.split + "." + name;
      var series = self.data[key] || (self.data[key] = { x: [], y: [] });
      series.x.push(point.step);
      series.y.push(value);
      self.setLatest(key, value, point.step);
    });
    if (point.epoch !== null && point.epoch !== undefined) {
      var epoch = document.querySelector('[data-metric="epoch"]');
      epoch.textContent = point.epoch.toFixed(2);
      epoch.dataset.value = String(point.epoch);
      epoch.parentElement.hidden = false;
    }
    this.points += 1;
    this.showCount();
    this.scheduleRedraw();
  };

  // A "Latest" value with the step it was logged at: the checkpoints table lists values per checkpoint step, and
  // without the step a later log (0.68) next to a checkpoint's (0.69) reads as a disagreement.
  JobPage.prototype.setLatest = function (key, value, step) {
    var cell = document.querySelector('[data-metric="' + key + '"]');
    if (!cell) return;
    cell.textContent = key.indexOf("learning_rate") >= 0 ? scientific(value, 2) : formatNumber(value);
    cell.dataset.value = String(value); // the exact logged value, for scripts and tests
    cell.parentElement.hidden = false;
    if (step === null || step === undefined) return;
    var at = cell.parentElement.querySelector(".at-step");
    if (!at) {
      at = document.createElement("small");
      at.className = "muted at-step";
      cell.parentElement.appendChild(at);
    }
    at.textContent = "step " + step;
  };

  JobPage.prototype.scheduleRedraw = function () {
    if (this.redrawPending) return;
    this.redrawPending = true;
    var self = this;
    // A timer rather than requestAnimationFrame: it also runs in background tabs, so the chart is current on return.
    setTimeout(function () { self.redrawPending = false; self.redraw(); }, 100);
  };

  JobPage.prototype.redraw = function () {
    var self = this;
    this.charts.forEach(function (chart) {
      var tables = chart.keys.map(function (key) { return self.data[key] || { x: [], y: [] }; });
      var count = tables.reduce(function (n, t) { return n + t.y.length; }, 0);
      chart.element.dataset.pointCount = String(count);
      if (!count) return;
      if (chart.card.hidden) {
        chart.card.hidden = false;
        chart.plot.setSize({ width: Math.max(280, chart.element.clientWidth), height: 260 });
      }
      chart.plot.setData(align(tables));
      // A series this job never logs (CUDA memory on a CPU, token accuracy without labels) leaves no empty
      // "—" entry in the legend; row 0 is the step.
      var rows = chart.element.querySelectorAll(".u-legend .u-series");
      tables.forEach(function (table, i) {
        if (rows[i + 1]) rows[i + 1].style.display = table.y.length ? "" : "none";
      });
    });
  };

  JobPage.prototype.onStatus = function (snapshot) {
    var badge = document.getElementById("job-status");
    var changed = snapshot.status !== this.status;
    this.status = snapshot.status;
    this.root.dataset.status = snapshot.status;
    this.step = snapshot.step || 0;
    badge.textContent = snapshot.status;
    badge.className = "badge badge-" + snapshot.status;

    var percent = Math.round((snapshot.progress || 0) * 1000) / 10;
    var progress = document.getElementById("job-progress");
    progress.setAttribute("aria-valuenow", String(Math.round(percent)));
    progress.querySelector(".progress-bar").style.width = percent + "%";
    document.getElementById("job-progress-text").textContent = Math.round(percent) + "%";
    document.getElementById("job-step").textContent =
      "step " + (snapshot.step || 0) + (snapshot.total_steps ? " / " + snapshot.total_steps : "");
    if (snapshot.total_steps) this.charts.forEach(function (chart) { chart.options.totalSteps = snapshot.total_steps; });
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

  // The compare view (and a sweep's page): one chart per metric, one line per job, refreshed every 3 s while a
  // compared job is still queued or running.
  var COMPARE_ORDER = ["train.loss", "eval.loss", "eval.accuracy", "eval.f1_macro", "eval.token_accuracy",
                       "eval.perplexity", "eval.rewards/accuracies", "eval.rewards/margins", "train.rewards/margins",
                       "train.learning_rate", "train.grad_norm", "train.samples_per_second",
                       "train.tokens_per_second", "train.peak_rss_mb", "train.cuda_peak_mb"];
  var COMPARE_SKIP = ["eval.runtime", "eval.samples_per_second", "eval.steps_per_second",
                      "train.num_input_tokens_seen", "eval.num_input_tokens_seen", "train.total_flos"];

  function ComparePage(root) {
    this.root = root;
    this.ids = root.dataset.jobIds.split(",").filter(Boolean);
    this.charts = {}; // series key -> {element, plot}
    this.series = {}; // job id -> {key: {x, y}}
    this.names = {};
    this.live = root.dataset.live === "true";
    var self = this;
    window.addEventListener("resize", function () {
      Object.keys(self.charts).forEach(function (key) {
        var chart = self.charts[key];
        chart.plot.setSize({ width: Math.max(280, chart.element.clientWidth), height: 240 });
      });
    });
    this.load();
  }

  ComparePage.prototype.load = function () {
    var self = this;
    var summary = getJSON("/api/v1/compare?jobs=" + this.ids.join(","));
    var series = this.ids.map(function (id) { return getJSON("/api/v1/jobs/" + id + "/series?max_points=1000"); });
    Promise.all([summary].concat(series)).then(function (bodies) {
      var running = false;
      bodies[0].summary.forEach(function (row) {
        self.names[row.job_id] = "#" + row.job_id + " " + row.name;
        if (TERMINAL.indexOf(row.status) < 0) running = true;
      });
      bodies.slice(1).forEach(function (body) { self.series[body.job_id] = body.series; });
      self.draw();
      self.root.dataset.loaded = "true";
      self.live = running;
      self.root.dataset.live = running ? "true" : "false";
      if (running) setTimeout(function () { self.load(); }, 3000);
    }).catch(function (error) {
      self.root.dataset.error = String(error);
      setTimeout(function () { self.load(); }, 5000);
    });
  };

  ComparePage.prototype.keys = function () {
    var all = new Set();
    var self = this;
    this.ids.forEach(function (id) { Object.keys(self.series[id] || {}).forEach(function (k) { all.add(k); }); });
    var keys = Array.from(all).filter(function (k) { return COMPARE_SKIP.indexOf(k) < 0; });
    return keys.sort(function (a, b) {
      var ia = COMPARE_ORDER.indexOf(a), ib = COMPARE_ORDER.indexOf(b);
      if (ia < 0) ia = 1000;
      if (ib < 0) ib = 1000;
      return ia - ib || (a < b ? -1 : a > b ? 1 : 0);
    });
  };

  ComparePage.prototype.draw = function () {
    var self = this;
    var container = document.getElementById("compare-charts");
    this.keys().forEach(function (key) {
      var chart = self.charts[key];
      if (!chart) {
        var box = document.createElement("div");
        box.className = "compare-chart";
        box.dataset.series = key;
        var title = document.createElement("h3");
        title.textContent = key.replace(".", " ").replace(/_/g, " ");
        var element = document.createElement("div");
        element.className = "chart";
        element.dataset.testid = "compare-chart";
        element.setAttribute("data-testid", "compare-chart");
        element.dataset.key = key;
        box.appendChild(title);
        box.appendChild(element);
        container.appendChild(box);
        var lines = self.ids.map(function (id, i) {
          return { label: self.names[id] || "#" + id, color: PALETTE[i % PALETTE.length], points: key.indexOf("eval.") === 0 };
        });
        chart = self.charts[key] = { element: element, plot: makeChart(element, key.split(".")[1], lines, null, 240,
                                                                { scientific: key.indexOf("learning_rate") >= 0 }) };
      }
      var tables = self.ids.map(function (id) { return (self.series[id] || {})[key] || { x: [], y: [] }; });
      chart.element.dataset.seriesCount = String(tables.filter(function (t) { return t.y.length > 0; }).length);
      chart.element.dataset.pointCount = String(tables.reduce(function (n, t) { return n + t.y.length; }, 0));
      chart.plot.setData(align(tables));
    });
  };

  // The job form: settings of a task-specific section (e.g. causal_lm) show only while that task is chosen.
  function syncTaskSections() {
    var task = document.getElementById("f-task");
    if (!task) return;
    document.querySelectorAll("[data-only-for-task]").forEach(function (section) {
      section.hidden = section.dataset.onlyForTask.split(" ").indexOf(task.value) < 0;
    });
  }

  document.addEventListener("DOMContentLoaded", function () {
    var root = document.getElementById("job-live");
    if (root && window.uPlot) window.jobPage = new JobPage(root);
    var compare = document.getElementById("compare");
    if (compare && window.uPlot) window.comparePage = new ComparePage(compare);
    var task = document.getElementById("f-task");
    if (task) {
      task.addEventListener("change", syncTaskSections);
      syncTaskSections();
    }
  });
})();
