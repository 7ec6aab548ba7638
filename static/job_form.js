// The job form after htmx swapped fields in (choosing a dataset replaces the task select and the column
// fields): the new task select shows and hides the task-specific sections like the one it replaced.
(function () {
  "use strict";
  function syncTaskSections() {
    var task = document.getElementById("f-task");
    if (!task) return;
    document.querySelectorAll("[data-only-for-task]").forEach(function (section) {
      section.hidden = section.dataset.onlyForTask !== task.value;
    });
  }
  function bindTask() {
    var task = document.getElementById("f-task");
    if (task && !task.dataset.taskBound) {
      task.dataset.taskBound = "1";
      task.addEventListener("change", syncTaskSections);
    }
    syncTaskSections();
  }
  document.addEventListener("DOMContentLoaded", bindTask);
  document.addEventListener("htmx:afterSettle", bindTask);
})();
