"""Execute a notebook in place with nbclient (what CI can use when nbconvert is not installed):
    python notebooks/run_notebook.py notebooks/relu_attention.ipynb"""
import sys
import time

import nbclient
import nbformat

path = sys.argv[1] if len(sys.argv) > 1 else "notebooks/relu_attention.ipynb"
nb = nbformat.read(path, as_version=4)
t0 = time.perf_counter()
nbclient.NotebookClient(nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": "."}}).execute()
nbformat.write(nb, path)
print(f"executed {path} in {time.perf_counter() - t0:.0f} s")
