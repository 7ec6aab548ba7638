"""Request plumbing shared by app.api and app.web (gate, auth, deps, body limits, rate limits); may import app.core and app.services."""
