// Behaviour every page shares, kept out of the templates because the Content-Security-Policy (app/http/gate.py)
// runs no inline script, no inline event handler and no javascript: URL. Loaded at the end of <body>, before
// the deferred scripts, so fetch() is wrapped before anything else calls it.
// CSRF for everything a signed-in page sends: htmx gets the header from hx-headers on <body>; plain forms
// that post get the hidden field (even forms written without csrf_input()); same-origin fetch() the header.
(function () {
  var token = document.querySelector('meta[name="csrf-token"]').content;
  if (!token) return;
  document.addEventListener("submit", function (event) {
    var form = event.target;
    // getAttribute: a control named "method" (the job form's <select name="method">) shadows form.method.
    if ((form.getAttribute("method") || "get").toLowerCase() !== "post" || form.querySelector('input[name="csrf_token"]')) return;
    var input = document.createElement("input");
    input.type = "hidden"; input.name = "csrf_token"; input.value = token;
    form.appendChild(input);
  }, true);
  var nativeFetch = window.fetch.bind(window);
  window.fetch = function (resource, init) {
    init = Object.assign({}, init || {});
    var method = (init.method || (resource instanceof Request ? resource.method : "GET")).toUpperCase();
    var url = new URL(resource instanceof Request ? resource.url : String(resource), location.href);
    if (url.origin === location.origin && method !== "GET" && method !== "HEAD") {
      var headers = new Headers(init.headers || (resource instanceof Request ? resource.headers : {}));
      if (!headers.has("X-CSRF-Token")) headers.set("X-CSRF-Token", token);
      init.headers = headers;
    }
    return nativeFetch(resource, init);
  };
})();

// After an htmx request succeeds: data-after-success="reload" reloads the page; "open-job" opens the job whose
// JSON the request answered (resume, retry). This replaces hx-on attributes, which htmx runs through eval.
document.addEventListener("htmx:afterRequest", function (event) {
  var element = event.detail.elt;
  var action = element && element.getAttribute && element.getAttribute("data-after-success");
  if (!action || !event.detail.successful) return;
  if (action === "reload") location.reload();
  if (action === "open-job") location.href = "/jobs/" + JSON.parse(event.detail.xhr.responseText).id;
});

// <a data-action="back">: the browser's back button, as a link.
document.addEventListener("click", function (event) {
  var link = event.target.closest && event.target.closest('[data-action="back"]');
  if (!link) return;
  event.preventDefault();
  history.back();
});

// <select data-submit-on-change> (or any form control): submits its form when its value changes — the
// CSP-safe form of onchange="this.form.submit()".
document.addEventListener("change", function (event) {
  var control = event.target.closest && event.target.closest("[data-submit-on-change]");
  if (!control || !control.form) return;
  if (control.form.requestSubmit) control.form.requestSubmit(); else control.form.submit();
});
