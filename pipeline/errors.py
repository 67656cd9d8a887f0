"""Typed row errors: the reason codes the pipeline records for quarantined rows."""

from __future__ import annotations

from dataclasses import dataclass


class RowError(ValueError):
    """A row that cannot be scored. `reason` is a stable code; the message says what was found."""

    def __init__(self, reason: str, detail: str):
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


@dataclass(frozen=True)
class Rejected:
    """A trajectory the student could not score, with the reject reason (below) and why."""

    reason: str
    detail: str


# Stable reason codes (they land in the rejects table, so automation may match on them).
BLANK_LINE = "blank_line"
UNREADABLE_FILE = "unreadable_file"
EMPTY_FILE = "empty_file"
MALFORMED_JSON = "malformed_json"
NOT_AN_OBJECT = "not_an_object"
BAD_ENCODING = "bad_encoding"
MISSING_MESSAGES = "missing_messages"
MESSAGES_NOT_A_LIST = "messages_not_a_list"
BAD_MESSAGE = "bad_message"
UNKNOWN_ROLE = "unknown_role"
NON_STRING_CONTENT = "non_string_content"
NON_STRING_REASONING = "non_string_reasoning"
BAD_PROMPT = "bad_prompt"
BAD_RESPONSE = "bad_response"
BAD_SYSTEM = "bad_system"
NO_ASSISTANT_TURN = "no_assistant_turn"
EMPTY_ASSISTANT_CONTENT = "empty_assistant_content"
TEMPLATE_ERROR = "template_error"
NO_RESPONSE_TOKENS = "no_response_tokens"
EMPTY_SCOPE = "empty_scope"  # nothing of the row in `scoring.scope` (e.g. no reasoning for scope reasoning)
TOO_LONG = "too_long"
DUPLICATE_ID = "duplicate_id"
UNSUPPORTED_CONTENT_PART = "unsupported_content_part"
TOO_LONG_FOR_DEVICE = "too_long_for_device"
BAD_CANDIDATES = "bad_candidates"
MISALIGNED_CANDIDATES = "misaligned_candidates"
