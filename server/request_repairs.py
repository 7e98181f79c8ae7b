"""Request bodies that vLLM 0.32's own routes break on, mended or refused before they run.

The gateway applies these before it takes out the steering fields (server/request_fields.py); each names the vLLM
behaviour it guards against, so it can go when vLLM no longer needs it.
"""

from __future__ import annotations

from .errors import APIError

RESPONSES_ROUTE = "/v1/responses"


def repair_responses_body(request: dict) -> bool:
    """Mend or refuse what vLLM 0.32's Responses API breaks on; True when the body changed.

    - A top-level null: its ResponsesRequest accepts null for `background` and `truncation`, its
      ResponsesResponse does not, so a streamed response dies after its headers. In the OpenAI API
      null means "not given": the key is dropped and the field takes its default.
    - An input message whose `content` is an empty list: it indexes the first part (an IndexError,
      answered 500), so it is a 400 naming the item.
    """
    items = request.get("input")
    for i, item in enumerate(items if isinstance(items, list) else []):
        if isinstance(item, dict) and item.get("type", "message") == "message" and item.get("content") == []:
            raise APIError(400, f"input[{i}].content is empty: a message needs at least one content part",
                           param=f"input[{i}].content", code="invalid_input")
    nulls = [key for key, value in request.items() if value is None]
    for key in nulls:
        del request[key]
    return bool(nulls)


REPAIRS = {RESPONSES_ROUTE: repair_responses_body}  # route template -> its repair


def repair(request: dict, template: str) -> bool:
    """Apply the repair of `template`'s route, if it has one; True when the body changed."""
    mend = REPAIRS.get(template)
    return mend(request) if mend is not None else False
