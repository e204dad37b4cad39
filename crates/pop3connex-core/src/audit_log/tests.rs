//! Tests of the audit log against a real SQLite store: round trip, and
//! every kind of tampering detected and named.
