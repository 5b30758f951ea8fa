"""A failure inside one request's own work (its text, its tool call) ends that request with
finish_reason "error" and frees its slot; the requests beside it decode on unchanged."""

from __future__ import annotations

from chatlm.engine import Engine, SamplingParams
from tests.engine.test_engine import run
from tests.engine.test_generate import PROMPTS, make_model, naive_greedy


class PoisonTokenizer:
    """Decodes ids as `<id>`, except that any text holding `poison` cannot be decoded."""

    def __init__(self, poison: int):
        self.poison = poison

    def decode(self, ids) -> str:
        ids = list(ids)
        if self.poison in ids:
            raise UnicodeError(f"cannot decode token {self.poison}")
        return "".join(f"<{i}>" for i in ids)


def test_a_failing_request_ends_alone_and_frees_its_slot():
    model = make_model()
    n = 12
    a_ref, b_ref = naive_greedy(model, PROMPTS[0], n), naive_greedy(model, PROMPTS[1], n)
    poison = next(t for t in a_ref if t not in b_ref)
    at = a_ref.index(poison)
    engine = Engine(model, PoisonTokenizer(poison), max_batch=2, max_len=64)
    a = engine.add(PROMPTS[0], SamplingParams(max_tokens=n))
    b = engine.add(PROMPTS[1], SamplingParams(max_tokens=n))
    events = list(engine.stream())
    done = run(engine, events)
    assert done[a][0] == a_ref[:at] and done[a][1] == "error"
    (end,) = [e for e in events if e.request_id == a and e.finish_reason]
    assert end.error == f"UnicodeError: cannot decode token {poison}" and end.token is None
    assert done[b][:2] == (b_ref, "length")
    assert done[b][3] == "".join(f"<{t}>" for t in b_ref)
    assert engine.running == 0 and not engine.has_work()
    # the freed slot serves the next request
    c = engine.add(PROMPTS[1], SamplingParams(max_tokens=n))
    assert run(engine)[c][:2] == (b_ref, "length")
