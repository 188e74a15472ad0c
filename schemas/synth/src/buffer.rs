//! Row-at-a-time column buffers that turn into Arrow record batches.

use std::sync::Arc;

use arrow::array::{
    ArrayBuilder, ArrayRef, Date32Builder, Float64Builder, Int64Builder, RecordBatch, StringBuilder,
};
use arrow::datatypes::{DataType, SchemaRef};

use crate::error::SynthError;

enum ColumnBuffer {
    Int64(Int64Builder),
    Utf8(StringBuilder),
    Date32(Date32Builder),
    Float64(Float64Builder),
}

/// Buffers one table's rows; values are pushed in schema column order.
pub(crate) struct TableBuffer {
    schema: SchemaRef,
    columns: Vec<ColumnBuffer>,
    cursor: usize,
    mismatch: Option<String>,
}

impl TableBuffer {
    /// An empty buffer for a table whose columns are Int64, Utf8, Date32 or Float64.
    pub(crate) fn new(schema: SchemaRef) -> Result<Self, SynthError> {
        let columns = schema
            .fields()
            .iter()
            .map(|f| match f.data_type() {
                DataType::Int64 => Ok(ColumnBuffer::Int64(Int64Builder::new())),
                DataType::Utf8 => Ok(ColumnBuffer::Utf8(StringBuilder::new())),
                DataType::Date32 => Ok(ColumnBuffer::Date32(Date32Builder::new())),
                DataType::Float64 => Ok(ColumnBuffer::Float64(Float64Builder::new())),
                other => Err(SynthError::Schema(format!(
                    "column `{}` has type {other}, which the generator cannot produce",
                    f.name()
                ))),
            })
            .collect::<Result<_, _>>()?;
        Ok(TableBuffer {
            schema,
            columns,
            cursor: 0,
            mismatch: None,
        })
    }

    fn next_column(&mut self, expected: &str) -> Option<&mut ColumnBuffer> {
        let index = self.cursor;
        self.cursor += 1;
        let column = self.columns.get_mut(index);
        if column.is_none() && self.mismatch.is_none() {
            self.mismatch = Some(format!("more values than columns ({expected})"));
        }
        column
    }

    fn wrong(&mut self, expected: &str) {
        if self.mismatch.is_none() {
            let name = self
                .schema
                .fields()
                .get(self.cursor.saturating_sub(1))
                .map(|f| f.name().clone())
                .unwrap_or_default();
            self.mismatch = Some(format!("column `{name}` was given a {expected}"));
        }
    }

    /// Appends an integer (or null) to the next column.
    pub(crate) fn int(&mut self, value: Option<i64>) -> &mut Self {
        match self.next_column("int64") {
            Some(ColumnBuffer::Int64(b)) => b.append_option(value),
            Some(_) => self.wrong("int64"),
            None => {}
        }
        self
    }

    /// Appends text (or null) to the next column.
    pub(crate) fn text(&mut self, value: Option<&str>) -> &mut Self {
        match self.next_column("utf8") {
            Some(ColumnBuffer::Utf8(b)) => b.append_option(value),
            Some(_) => self.wrong("utf8"),
            None => {}
        }
        self
    }

    /// Appends a date in days since 1970-01-01 (or null) to the next column.
    pub(crate) fn date(&mut self, value: Option<i32>) -> &mut Self {
        match self.next_column("date32") {
            Some(ColumnBuffer::Date32(b)) => b.append_option(value),
            Some(_) => self.wrong("date32"),
            None => {}
        }
        self
    }

    /// Appends a float (or null) to the next column.
    pub(crate) fn float(&mut self, value: Option<f64>) -> &mut Self {
        match self.next_column("float64") {
            Some(ColumnBuffer::Float64(b)) => b.append_option(value),
            Some(_) => self.wrong("float64"),
            None => {}
        }
        self
    }

    /// Ends the current row; every column must have had exactly one value.
    pub(crate) fn end_row(&mut self) {
        if self.cursor != self.columns.len() && self.mismatch.is_none() {
            self.mismatch = Some(format!(
                "a row had {} values for {} columns",
                self.cursor,
                self.columns.len()
            ));
        }
        self.cursor = 0;
    }

    /// Takes the buffered rows as a record batch and empties the buffer.
    pub(crate) fn finish(&mut self) -> Result<RecordBatch, SynthError> {
        if let Some(problem) = self.mismatch.take() {
            return Err(SynthError::Encode(format!(
                "{problem} in a generated row (a generator bug)"
            )));
        }
        let arrays: Vec<ArrayRef> = self
            .columns
            .iter_mut()
            .map(|c| match c {
                ColumnBuffer::Int64(b) => ArrayBuilder::finish(b),
                ColumnBuffer::Utf8(b) => ArrayBuilder::finish(b),
                ColumnBuffer::Date32(b) => ArrayBuilder::finish(b),
                ColumnBuffer::Float64(b) => ArrayBuilder::finish(b),
            })
            .collect();
        RecordBatch::try_new(Arc::clone(&self.schema), arrays)
            .map_err(|e| SynthError::Encode(e.to_string()))
    }
}
