"""The contracts of the stores, as pytest tests any backend can be held to, in the spirit of
LangGraph's checkpointer conformance tests: ``runs`` (RunStore), ``goals`` (GoalStore),
``executions`` (ExecutionStore) and ``keys`` (KeyStore). To run one against a backend, import its
tests into a test module and give them a ``store`` fixture that yields an open, empty store of that
backend::

    from tierstack.server.conformance.runs import *  # the suite's tests

    @pytest.fixture
    async def store() -> AsyncIterator[RunStore]:
        backend = MyRunStore(...)
        await backend.open()
        yield backend
        await backend.close()

The tests are coroutines, for pytest-asyncio (``asyncio_mode = "auto"``).
"""
