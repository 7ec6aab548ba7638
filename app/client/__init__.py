"""The command-line client of the REST API (httpx + typer); imports nothing of the server."""
