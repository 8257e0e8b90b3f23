"""examples/notebook.ipynb runs top to bottom in a real Jupyter kernel (nbclient +
ipykernel) and shows what it says: HTML for the cache and the table, the copy and the
offload checked, a bandwidth plot; the committed notebook carries no outputs."""

import pathlib

import pytest

NOTEBOOK = pathlib.Path(__file__).resolve().parent.parent / "examples" / "notebook.ipynb"


def outputs_of(cell):
    texts, kinds = [], set()
    for output in cell.get("outputs", []):
        kinds.add(output["output_type"])
        if output["output_type"] == "stream":
            texts.append(output["text"])
        for mime, value in output.get("data", {}).items():
            kinds.add(mime)
            if mime.startswith("text/"):
                texts.append(value if isinstance(value, str) else "".join(value))
    return "".join(texts), kinds


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert code and all(not cell.outputs and cell.execution_count is None for cell in code)


def test_the_notebook_runs_in_a_kernel_and_shows_its_results(tmp_path):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    pytest.importorskip("matplotlib")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    )
    client.execute()
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    shown = [outputs_of(cell) for cell in code]
    assert all("error" not in kinds for _, kinds in shown)
    everything = "".join(text for text, _ in shown)
    assert "Limits(max_addrs=240" in everything
    assert any("text/html" in kinds and "Cache " in text for text, kinds in shown)  # the cache, as HTML
    table = next(text for text, kinds in shown if "placement" in text and "in flight" in text)
    assert "<table" in table and "DT_FLOAT16" in table
    assert "copied: True" in everything and "offloaded and back: True" in everything
    assert any("image/png" in kinds for _, kinds in shown)  # the bandwidth plot
    assert "True" in shown[-2][0] and "notebook OK" in shown[-1][0]
