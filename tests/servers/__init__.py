"""Test servers (stdlib) started by the tests."""
