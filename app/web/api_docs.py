"""The interactive API docs at ``/docs``: Swagger UI served from ``static/vendor/swagger-ui`` so it works offline.

FastAPI's own page loads Swagger UI from a CDN and starts it with an inline script; the studio runs on closed
networks and its Content-Security-Policy runs no inline script (app/http/gate.py), so the page here loads the vendored
bundle and a static start-up file (static/api_docs.js) instead.
"""

from starlette.requests import Request
from starlette.responses import HTMLResponse

DOCS_PAGE = """<!doctype html>
<html lang="en">
<head>
  <meta charset="utf-8">
  <meta name="viewport" content="width=device-width, initial-scale=1">
  <title>PEFT Studio · API docs</title>
  <link rel="icon" href="/static/vendor/swagger-ui/favicon-32x32.png" type="image/png">
  <link rel="stylesheet" href="/static/vendor/swagger-ui/swagger-ui.css">
</head>
<body>
  <div id="swagger-ui" data-openapi-url="{openapi_url}"></div>
  <script src="/static/vendor/swagger-ui/swagger-ui-bundle.js"></script>
  <script src="/static/api_docs.js"></script>
</body>
</html>
"""


async def api_docs_page(request: Request) -> HTMLResponse:
    """Swagger UI for ``/openapi.json``, every asset from /static (added with ``app.add_route``: like FastAPI's
    own docs route it is outside the routers' sign-in dependency; app/http/gate.py decides who may see it)."""
    openapi_url = request.app.openapi_url or "/openapi.json"
    return HTMLResponse(DOCS_PAGE.replace("{openapi_url}", openapi_url))
