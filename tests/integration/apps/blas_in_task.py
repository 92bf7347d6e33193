"""A matrix product in a task whose budget is smaller than OpenBLAS's work
buffer: ``python blas_in_task.py [SIZE] [--outside]`` (``--outside``: the
product runs outside the task, where nothing refuses it)."""

import sys

import numpy

import allocpolicy

n = int(sys.argv[1]) if len(sys.argv) > 1 else 600
a = numpy.ones((n, n))
try:
    with allocpolicy.task("tiny") if "--outside" not in sys.argv else allocpolicy.scope("outside"):
        c = a @ a
    print("product", c.sum())
except allocpolicy.AllocError as err:
    print("AllocError", err)
