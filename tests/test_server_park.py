"""`tova serve --park-dir`: an idle conversation is parked to disk when a new one needs its slot, and its
follow-up is loaded back, evaluates only its new tokens and answers what it answers without the interruption
(greedy; the resumed cache returns to its own cells: docs/STATE.md). Parked files survive a restart."""

from __future__ import annotations

from test_server import _client, _metric, run_server

FIRST = [{"role": "user", "content": "List three colours of the sea, one per line."}]
OTHER = [{"role": "user", "content": "Write one sentence about mountains and snow."}]
ARGS = ["--slots", "1", "--budget", "32", "--chunk", "32", "--temp", "0", "--api-key", "test-key-123"]


def turn(c, messages, n=12):
    r = c.chat.completions.create(model="x", messages=messages, max_tokens=n, temperature=0)
    return r.choices[0].message.content, r.usage


def follow_up(messages, reply):
    return messages + [{"role": "assistant", "content": reply}, {"role": "user", "content": "And one more?"}]


def test_a_parked_conversation_resumes_where_it_was(smollm2_path, tmp_path):
    park = tmp_path / "park"
    with run_server(smollm2_path, *ARGS) as (url, _):  # the reference: nothing comes between the turns
        c = _client(url)
        reply, _ = turn(c, FIRST)
        want, want_usage = turn(c, follow_up(FIRST, reply))
    with run_server(smollm2_path, *ARGS, "--park-dir", str(park)) as (url, _):
        c = _client(url)
        assert turn(c, FIRST)[0] == reply
        assert list(park.glob("*.tova")) == []
        other, _ = turn(c, OTHER)  # one slot: the first conversation goes to disk
        assert len(list(park.glob("*.tova"))) == 1
        got, usage = turn(c, follow_up(FIRST, reply))  # loaded back; the other one is parked in turn
        assert got == want
        assert (
            usage.prompt_tokens_details.cached_tokens == want_usage.prompt_tokens_details.cached_tokens > 20
        )
        assert usage.prompt_tokens - usage.prompt_tokens_details.cached_tokens < 20  # only the new turn
        assert len(list(park.glob("*.tova"))) == 1
        assert (_metric(url, "tova_parked_total"), _metric(url, "tova_resumed_total")) == (2, 1)
    with run_server(smollm2_path, *ARGS, "--park-dir", str(park)) as (url, _):  # a restart finds it again
        c = _client(url)
        _, usage = turn(c, follow_up(OTHER, other))
        assert usage.prompt_tokens_details.cached_tokens > 10
        assert list(park.glob("*.tova")) == []
