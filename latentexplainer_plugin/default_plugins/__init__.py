"""Built-in plugins: each module implements hooks from ``hookspecs`` exactly as a third-party plugin would."""
