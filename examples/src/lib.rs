//! Runnable examples of the outbox framework; see the `examples/` programs.
