"""The compiled extension loads and reports how it was built."""
import fastqlora._C as C


def test_extension_loads():
    assert isinstance(C.built_with_cuda(), bool)
    if C.built_with_cuda():
        assert C.cuda_runtime_version() >= 11000
    else:
        assert C.cuda_runtime_version() == 0
