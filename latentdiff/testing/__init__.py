"""Tiny random models for tests, examples and benchmarks: built in code, nothing downloaded."""
