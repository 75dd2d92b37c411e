import pytest


@pytest.fixture(autouse=True)
def fresh_accelerator_state():
    """Accelerate keeps one global state per process; each test may configure its own Accelerator."""
    yield
    from accelerate.state import AcceleratorState, GradientState

    AcceleratorState._reset_state(reset_partial_state=True)
    GradientState._reset_state()
