"""The technician's terminal UI (Textual): a client of the status API; it never opens the SQLite file."""
