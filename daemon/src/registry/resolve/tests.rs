//! Precedence and merge tests.
