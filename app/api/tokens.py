"""/api/v1/tokens: the signed-in user's API tokens (create: shown once; list; revoke)."""

from fastapi import APIRouter, status
from pydantic import BaseModel, ConfigDict, Field

from app.core.models import ApiTokenPublic, ApiTokensPublic
from app.http.auth import CurrentUser
from app.http.deps import SessionDep
from app.services import audit
from app.services.accounts import api_token_public, create_api_token, list_api_tokens, revoke_api_token

router = APIRouter(prefix="/api/v1/tokens", tags=["tokens"])


class TokenCreate(BaseModel):
    model_config = ConfigDict(extra="forbid")  # a misspelt field is an error, not ignored
    name: str = Field(min_length=1, max_length=100, description="What the token is for, e.g. 'laptop CLI'.")
    expires_days: float | None = Field(
        default=None, gt=0, le=3650, description="Days until it stops working; empty: until revoked."
    )


class TokenCreated(ApiTokenPublic):
    token: str = Field(description="The token itself. It is shown only now: store it somewhere safe.")


@router.post("", status_code=status.HTTP_201_CREATED, response_model=TokenCreated)
def create_token(session: SessionDep, user: CurrentUser, body: TokenCreate) -> TokenCreated:
    """A new API token for you; send it as `Authorization: Bearer <token>`. Only its hash is stored."""
    token, raw = create_api_token(session, user, body.name, body.expires_days)
    audit.record(session, user, "create", "token", token.id, token.name)
    return TokenCreated(**api_token_public(token).model_dump(), token=raw)


@router.get("", response_model=ApiTokensPublic)
def list_tokens(session: SessionDep, user: CurrentUser) -> ApiTokensPublic:
    """Your tokens, newest first: name, first characters, last use; revoked ones are marked."""
    rows = list_api_tokens(session, user.id or 0)
    return ApiTokensPublic(data=[api_token_public(row) for row in rows], count=len(rows))


@router.delete("/{token_id}", status_code=status.HTTP_204_NO_CONTENT)
def revoke_token(session: SessionDep, user: CurrentUser, token_id: int) -> None:
    """Revoke one of your tokens; requests with it fail from the next one on."""
    token = revoke_api_token(session, user, token_id)
    audit.record(session, user, "revoke", "token", token.id, token.name)
