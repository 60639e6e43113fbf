"""Shared test helpers (not tests): golden cases, tiny checkpoints, chat cases, server runs."""
