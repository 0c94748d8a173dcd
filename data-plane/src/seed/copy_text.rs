//! Rows in PostgreSQL's COPY text format.

use std::fmt::Write as _;

/// One table's COPY text stream.
#[derive(Debug)]
pub struct CopyText {
    buf: String,
    first_in_row: bool,
}

impl Default for CopyText {
    fn default() -> Self {
        Self::new()
    }
}

impl CopyText {
    /// An empty stream.
    pub fn new() -> Self {
        Self {
            buf: String::new(),
            first_in_row: true,
        }
    }

    fn sep(&mut self) {
        if !self.first_in_row {
            self.buf.push('\t');
        }
        self.first_in_row = false;
    }

    /// A text value, escaped.
    pub fn text(&mut self, v: &str) -> &mut Self {
        self.sep();
        for c in v.chars() {
            match c {
                '\\' => self.buf.push_str("\\\\"),
                '\t' => self.buf.push_str("\\t"),
                '\n' => self.buf.push_str("\\n"),
                '\r' => self.buf.push_str("\\r"),
                c => self.buf.push(c),
            }
        }
        self
    }

    /// A value whose text form needs no escaping (numbers, booleans, uuids).
    pub fn plain(&mut self, v: impl std::fmt::Display) -> &mut Self {
        self.sep();
        let _ = write!(self.buf, "{v}");
        self
    }

    /// A bytea value in hex form.
    pub fn bytea(&mut self, v: &[u8]) -> &mut Self {
        self.sep();
        self.buf.push_str("\\\\x");
        self.buf.push_str(&hex::encode(v));
        self
    }

    /// SQL NULL.
    pub fn null(&mut self) -> &mut Self {
        self.sep();
        self.buf.push_str("\\N");
        self
    }

    /// Ends the row.
    pub fn end_row(&mut self) {
        self.buf.push('\n');
        self.first_in_row = true;
    }

    /// The stream so far.
    pub fn as_bytes(&self) -> &[u8] {
        self.buf.as_bytes()
    }

    /// The stream, without copying it.
    pub fn into_bytes(self) -> bytes::Bytes {
        bytes::Bytes::from(self.buf)
    }
}

/// Sends `text` (rendered rows) through `statement` (a `COPY ... FROM STDIN`)
/// in `tx`.
pub(crate) async fn copy_rows(
    tx: &tokio_postgres::Transaction<'_>,
    statement: &str,
    text: bytes::Bytes,
) -> Result<(), tokio_postgres::Error> {
    use futures_util::SinkExt;
    let sink = tx.copy_in::<_, bytes::Bytes>(statement).await?;
    futures_util::pin_mut!(sink);
    sink.send(text).await?;
    sink.finish().await?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn escapes_specials_and_encodes_bytea_and_null() {
        let mut c = CopyText::new();
        c.text("a\tb\\c\nd").bytea(&[0xde, 0xad]).null().plain(42);
        c.end_row();
        c.plain(true);
        c.end_row();
        assert_eq!(c.as_bytes(), b"a\\tb\\\\c\\nd\t\\\\xdead\t\\N\t42\ntrue\n");
    }
}
