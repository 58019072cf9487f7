from gateway import sse
from gateway.errors import BadRequest


def test_events_frame_each_payload():
    assert sse.events(['{"a":1}', '{"b":"é"}']) == 'data: {"a":1}\n\ndata: {"b":"é"}\n\n'.encode()


def test_done_and_error_event():
    assert sse.DONE == b"data: [DONE]\n\n"
    event = sse.error_event(BadRequest("bad", param="n"))
    assert event == b'data: {"error": {"message": "bad", "type": "invalid_request_error", "param": "n", "code": null}}\n\n'
