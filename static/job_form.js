// The job form after htmx swapped fields in (choosing a dataset replaces the task select and the column
// fields): the new task select shows and hides the task-specific sections like the one it replaced.
(function () {
  "use strict";
  function syncTaskSections() {
    var task = document.getElementById("f-task");
    if (!task) return;
    document.querySelectorAll("[data-only-for-task]").forEach(function (section) {
      section.hidden = section.dataset.onlyForTask.split(" ").indexOf(task.value) < 0;
    });
  }
  // The base model's suggestions are the library's models for the chosen task (GET /api/v1/models?task=);
  // a base model that does not suit the new task is replaced by the first one that does.
  function syncBaseModels() {
    var task = document.getElementById("f-task");
    var input = document.getElementById("f-base-model");
    if (!task || !input) return;
    fetch("/api/v1/models?task=" + encodeURIComponent(task.value), { credentials: "same-origin" })
      .then(function (response) { return response.ok ? response.json() : null; })
      .then(function (body) {
        if (!body) return;
        body.data.forEach(function (m) { ownTemplate[m.model_id] = !!m.chat_template; });
        var ids = body.data.filter(function (m) { return !m.problems.length; }).map(function (m) { return m.model_id; });
        var list = document.getElementById("f-base-model-options");
        if (!list) {
          list = document.createElement("datalist");
          list.id = "f-base-model-options";
          input.after(list);
          input.setAttribute("list", list.id);
        }
        list.replaceChildren.apply(list, ids.map(function (id) {
          var option = document.createElement("option");
          option.value = id;
          return option;
        }));
        var known = body.data.map(function (m) { return m.model_id; });
        if (ids.length && known.indexOf(input.value) === -1 && input.dataset.libraryChecked) {
          input.value = ids[0];
        }
        input.dataset.libraryChecked = "1";
        input.title = ids.length ? "" : "No model for this task on this machine yet: download one on the Models page.";
        syncTemplate();
      });
  }
  // The chat template a causal-LM job proposes: a library model with its own template is trained with it
  // ("auto" is the model's own, chosen unless the person picked another); one without falls back to the
  // studio's default (alpaca).
  var ownTemplate = {}; // model id -> whether it ships a chat template (GET /api/v1/models)
  function syncTemplate() {
    var input = document.getElementById("f-base-model");
    var select = document.getElementById("f-causal-lm-template");
    if (!input || !select) return;
    var auto = select.querySelector('option[value="auto"]');
    var note = document.getElementById("f-template-proposal");
    if (!note) {
      note = document.createElement("small");
      note.id = "f-template-proposal";
      note.className = "help";
      note.setAttribute("data-testid", "template-proposal");
      select.after(note);
    }
    var own = ownTemplate[input.value];
    if (own === true) {
      if (auto) auto.textContent = "the model's own";
      if (!select.dataset.touched) select.value = "auto";
      note.textContent = input.value + " has its own chat template: proposed.";
    } else if (own === false) {
      if (auto) auto.textContent = "auto: the studio's default (alpaca)";
      note.textContent = input.value + " has no chat template of its own: auto uses the studio's default, alpaca.";
    } else {
      if (auto) auto.textContent = "auto";
      note.textContent = "";
    }
  }
  function bindTask() {
    var task = document.getElementById("f-task");
    if (task && !task.dataset.taskBound) {
      task.dataset.taskBound = "1";
      task.addEventListener("change", syncTaskSections);
      task.addEventListener("change", syncBaseModels);
      syncBaseModels();
    }
    var input = document.getElementById("f-base-model");
    if (input && !input.dataset.templateBound) {
      input.dataset.templateBound = "1";
      input.addEventListener("change", syncTemplate);
      input.addEventListener("input", syncTemplate);
    }
    var select = document.getElementById("f-causal-lm-template");
    if (select && !select.dataset.templateBound) {
      select.dataset.templateBound = "1";
      select.addEventListener("change", function () { select.dataset.touched = "1"; });
    }
    syncTemplate();
    syncTaskSections();
  }
  document.addEventListener("DOMContentLoaded", bindTask);
  document.addEventListener("htmx:afterSettle", bindTask);
})();
