"""Run the repository's notebooks without Jupyter: for the tests, and to store the quickstart
executed (outputs and figures) so that GitHub shows its results:

    python -m tests.notebooks notebooks/quickstart.ipynb

Cells run in order in one IPython shell; the cell tagged "parameters" may be replaced (the tests
shrink the run; storing keeps the user's cell but runs it with INSTALL = False). The stored
notebook records a digest of its code cells: `test_report` fails when the code changes and the
outputs are not regenerated.
"""
import base64
import hashlib
import json
import os
import pprint
import sys
import tempfile

NOTEBOOK_INSTALL_OFF = "INSTALL = False  # running from this checkout\n"


def code_cells(notebook: dict) -> list:
    return [cell for cell in notebook["cells"] if cell["cell_type"] == "code"]


def code_digest(notebook: dict) -> str:
    """sha256 of the code cells' sources: what the stored outputs were produced from."""
    sources = ["".join(cell["source"]) for cell in code_cells(notebook)]
    return hashlib.sha256("\n# --- cell ---\n".join(sources).encode()).hexdigest()


def is_parameters(cell: dict) -> bool:
    return "parameters" in cell.get("metadata", {}).get("tags", [])


def notebook_outputs(captured, result) -> list:
    """nbformat outputs of one cell from IPython's captured streams, displays and result."""
    outputs = [{"output_type": "stream", "name": name, "text": text}
               for name, text in (("stdout", captured.stdout), ("stderr", captured.stderr)) if text]
    for display in captured.outputs:
        data = {kind: base64.b64encode(value).decode() if isinstance(value, bytes) else value
                for kind, value in display.data.items()}
        outputs.append({"output_type": "display_data", "data": data, "metadata": display.metadata or {}})
    if result.result is not None:
        outputs.append({"output_type": "execute_result", "data": {"text/plain": pprint.pformat(result.result)},
                        "metadata": {}, "execution_count": result.execution_count})
    return outputs


def execute(path: str, cwd: str, parameters: str = None):
    """Run the notebook's code cells in `cwd`; (the shell's namespace, the notebook with outputs).
    `parameters` replaces the "parameters" cell's source when running it (the stored source stays)."""
    from IPython.core.interactiveshell import InteractiveShell
    from IPython.utils.capture import capture_output

    with open(path) as f:
        notebook = json.load(f)
    shell = InteractiveShell.instance()
    shell.displayhook.write_output_prompt = lambda: None  # the result becomes an execute_result,
    shell.displayhook.write_format_data = lambda *args, **kwargs: None  # not "Out[n]:" on stdout
    old = os.getcwd()
    os.chdir(cwd)
    try:
        for count, cell in enumerate(code_cells(notebook), start=1):
            source = parameters if parameters is not None and is_parameters(cell) else "".join(cell["source"])
            with capture_output() as captured:
                result = shell.run_cell(source, store_history=True)
            result.raise_error()
            cell["outputs"], cell["execution_count"] = notebook_outputs(captured, result), count
    finally:
        os.chdir(old)
    namespace = dict(shell.user_ns)
    InteractiveShell.clear_instance()
    return namespace, notebook


def store_executed(path: str) -> None:
    """Execute the notebook as committed (INSTALL off) in a scratch folder and write it back with
    its outputs and the digest of the code they came from."""
    with open(path) as f:
        parameters = "".join(next(c for c in code_cells(json.load(f)) if is_parameters(c))["source"])
    with tempfile.TemporaryDirectory() as scratch:
        _, notebook = execute(path, scratch, parameters.replace("INSTALL = True", NOTEBOOK_INSTALL_OFF.strip()))
    notebook["metadata"]["sd_jax"] = {"code_digest": code_digest(notebook),
                                      "executed_with": "python -m tests.notebooks (CPU)"}
    with open(path, "w") as f:
        json.dump(notebook, f, indent=1)
        f.write("\n")


if __name__ == "__main__":
    for notebook_path in sys.argv[1:]:
        store_executed(notebook_path)
        print("stored", notebook_path, "with its outputs")
