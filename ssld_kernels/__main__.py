"""`python -m ssld_kernels`: version, backends, and why any backend is missing."""

from ssld_kernels._backends import describe

if __name__ == "__main__":
    print(describe())
