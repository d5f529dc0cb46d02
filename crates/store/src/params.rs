//! Placeholders for statements with many parameters.
//!
//! On SQLite, numbered parameters (`$1`, `$2`, …) cost O(n²) per statement: SQLite
//! looks each name up in a linear list while parsing, and sqlx asks SQLite for every
//! parameter's name when binding (`sqlite3_bind_parameter_name`, again a linear walk).
//! A 200-row insert with 2,800 parameters spent most of the SQLite thread's time there.
//! Anonymous `?` parameters have no names, so both steps are O(1) per parameter; they
//! bind in order of appearance, which is the order the `$n` numbering follows anyway.
//! PostgreSQL needs `$n`. These helpers emit whichever the backend wants; a statement
//! built with them must number its parameters in order of appearance and must not mix
//! in hand-written `$n` (on SQLite).

use crate::Backend;
use std::fmt::Write;

/// The placeholder of the `n`-th parameter (1-based) in order of appearance.
pub fn param(backend: Backend, n: usize, out: &mut String) {
    match backend {
        Backend::Sqlite => out.push('?'),
        Backend::Postgres => {
            let _ = write!(out, "${n}");
        }
    }
}

/// `(p1, …, pcols), (…), …` for `rows` rows, numbered from `first` (1-based).
pub fn values_from(backend: Backend, first: usize, rows: usize, cols: usize) -> String {
    let mut out = String::with_capacity(rows * cols * 4);
    for r in 0..rows {
        if r > 0 {
            out.push_str(", ");
        }
        out.push('(');
        for c in 0..cols {
            if c > 0 {
                out.push_str(", ");
            }
            param(backend, first + r * cols + c, &mut out);
        }
        out.push(')');
    }
    out
}

/// `(p1, …, pcols), (…), …` for `rows` rows, numbered from 1.
pub fn values(backend: Backend, rows: usize, cols: usize) -> String {
    values_from(backend, 1, rows, cols)
}

/// `p1, …, pn`, e.g. for an `IN (…)` list, numbered from 1.
pub fn list(backend: Backend, n: usize) -> String {
    let mut out = String::with_capacity(n * 4);
    for i in 1..=n {
        if i > 1 {
            out.push_str(", ");
        }
        param(backend, i, &mut out);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn numbered_on_postgres_anonymous_on_sqlite() {
        assert_eq!(values(Backend::Postgres, 2, 2), "($1, $2), ($3, $4)");
        assert_eq!(values(Backend::Sqlite, 2, 2), "(?, ?), (?, ?)");
        assert_eq!(values_from(Backend::Postgres, 3, 1, 2), "($3, $4)");
        assert_eq!(list(Backend::Postgres, 3), "$1, $2, $3");
        assert_eq!(list(Backend::Sqlite, 2), "?, ?");
    }
}
