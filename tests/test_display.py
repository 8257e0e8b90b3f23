"""Notebook and terminal display: _repr_html_ of Cache, CacheDesc, Usage, Limits and
Transfer, and registered_caches_table() as aligned text and as HTML. Rendering never
raises, even for a cache unregistered meanwhile."""

import html.parser

import pytest
import torch

import torch_kvreg as kv
from torch_kvreg import _C, display


class Cells(html.parser.HTMLParser):
    """The text of every <th>/<td>/<caption> cell, in order (also proves the HTML parses)."""

    def __init__(self, markup):
        super().__init__()
        self.cells, self._in = [], False
        self.feed(markup)

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td", "caption"):
            self._in = True
            self.cells.append("")

    def handle_endtag(self, tag):
        self._in = False if tag in ("th", "td", "caption") else self._in

    def handle_data(self, data):
        if self._in:
            self.cells[-1] += data


@pytest.fixture
def registry():
    kv.initialize()
    yield
    kv.finalize()


def test_every_object_renders_its_fields_as_html(registry):
    cache = kv.register_kv_cache(
        [torch.zeros(8, 4, dtype=torch.float16) for _ in range(2)], kv.RegisterCfg(remote_accessible=True)
    )
    cells = Cells(cache._repr_html_()).cells
    assert cells[0] == f"Cache {cache.cache_id}" and "registered" in cells and "yes" in cells
    assert "DT_FLOAT16" in cells and "(8, 4)" in cells and "128 B" in cells
    assert {"CacheDesc", "DT_FLOAT16", "8 B", "64 B", "128 B"} <= set(Cells(cache.cache_desc._repr_html_()).cells)
    assert {"Usage", "1", "2", "128 B"} <= set(Cells(kv.usage()._repr_html_()).cells)
    assert {"Limits", "240", "50.00 GiB", "20.00 GiB"} <= set(Cells(kv.limits()._repr_html_()).cells)


def test_a_transfer_shows_its_state_and_bytes(registry):
    src = kv.register_kv_cache([torch.ones(4, 4)])
    dst = kv.register_kv_cache([torch.zeros(4, 4)])
    waiting = kv.Transfer(4096, [3], "a test transfer")
    cells = Cells(waiting._repr_html_()).cells
    assert "in flight" in cells and "4.00 KiB" in cells and "a test transfer" in cells
    done = kv.copy_kv_blocks_async(src, dst, [0, 1], [2, 3])
    done.wait()
    cells = Cells(done._repr_html_()).cells
    assert "LLM_SUCCESS" in cells and "32 B" in cells and "[]" in cells
    waiting.fail(kv.errors.make_error(kv.LLMStatusCode.LLM_TIMEOUT, "late"))
    assert {"LLM_TIMEOUT", "[3]"} <= set(Cells(waiting._repr_html_()).cells)


def test_rendering_never_raises(registry):
    cache = kv.register_kv_cache([torch.zeros(4, 4)])
    kv.unregister_kv_cache(cache)
    assert "no (unregistered)" in Cells(cache._repr_html_()).cells
    kv.finalize()
    assert "no (unregistered)" in Cells(cache._repr_html_()).cells
    kv.initialize()

    def broken():
        raise RuntimeError("the field went away")

    cells = Cells(display.card("Broken", broken)).cells
    assert cells == ["Broken", "unavailable", "RuntimeError: the field went away"]
    assert "&lt;script&gt;" in display.card("x", lambda: [("name", "<script>")])  # escaped


def test_the_cache_table_in_text_and_html(registry):
    assert len(kv.registered_caches_table()) == 0 and "(none)" in kv.registered_caches_table()._repr_html_()
    a = kv.register_kv_cache([torch.zeros(16, 8, dtype=torch.bfloat16) for _ in range(4)])
    b = kv.register_kv_cache([torch.zeros(2, 3)], kv.RegisterCfg(remote_accessible=True))
    _C.hold(b.cache_id)
    table = kv.registered_caches_table()
    _C.unhold(b.cache_id)
    text = str(table).splitlines()
    assert text[0].split() == ["id", "placement", "dtype", "shape", "tensors", "bytes", "remote", "in", "flight"]
    # Aligned: every column starts where its header starts.
    starts = [text[0].index(name) for name in ("placement", "dtype", "tensors", "bytes", "remote")]
    for line in text[2:]:
        assert all(line[start - 2 : start] == "  " and line[start] != " " for start in starts), line
    assert text[2].split()[:5] == [str(a.cache_id), "HOST", "DT_BF16", "(16,", "8)"]
    assert text[2].split()[5:] == ["4", "1.00", "KiB", "no", "0"]
    assert text[3].split()[-2:] == ["yes", "1"]  # remote-accessible, one transfer holding it
    cells = Cells(table._repr_html_()).cells
    assert cells[:8] == ["id", "placement", "dtype", "shape", "tensors", "bytes", "remote", "in flight"]
    assert cells[8:16] == [str(a.cache_id), "HOST", "DT_BF16", "(16, 8)", "4", "1.00 KiB", "no", "0"]
    kv.unregister_kv_cache(a)
    kv.unregister_kv_cache(b)
    assert len(table) == 2 and str(table).count("\n") == 3  # a snapshot: still renders
