//! Built-in model zoo.
