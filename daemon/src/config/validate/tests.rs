//! Table-driven tests of the validation rules.
