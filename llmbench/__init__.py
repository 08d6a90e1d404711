"""The project's neutral helpers, shared by the harness and the engine; they import nothing heavy."""
