"""Bounds the gateway and the service both apply to a prompt's size, so both refuse the same requests."""

# More characters than this per token of the context window cannot fit it, whatever the tokenizer (a token spans a
# few characters; runs of spaces or repeats a few dozen at most).
MAX_CHARS_PER_TOKEN = 32
# A character takes at most this many bytes in a JSON body (a \uXXXX escape).
MAX_JSON_BYTES_PER_CHAR = 6
# Room in a body for everything besides the prompt's text (tool schemas, fields, markup).
BODY_OVERHEAD_BYTES = 1024 * 1024


def max_body_bytes_for(context_length: int) -> int:
    """The largest request body that could hold a prompt for this context window; anything larger is refused before
    it is read, since reading and parsing it alone would hold the gateway for a noticeable time."""
    return context_length * MAX_CHARS_PER_TOKEN * MAX_JSON_BYTES_PER_CHAR + BODY_OVERHEAD_BYTES
