//! Parsing CSV text into typed Arrow arrays; empty fields are nulls.

use std::sync::Arc;

use arrow::array::{ArrayRef, Date32Array, Float64Array, Int64Array, StringArray};
use trustql_schemas::ColumnType;

/// One column of a set of CSV records.
pub(crate) struct ColumnValues<'a> {
    /// The records.
    pub records: &'a [&'a csv::StringRecord],
    /// Field index in each record.
    pub source: usize,
}

impl ColumnValues<'_> {
    fn fields(&self) -> impl Iterator<Item = (u64, Option<&str>)> {
        self.records.iter().map(|r| {
            let line = r.position().map_or(0, |p| p.line());
            let value = r.get(self.source).map(str::trim).filter(|v| !v.is_empty());
            (line, value)
        })
    }
}

/// Parses a key field: empty is null; anything else must be an integer.
pub(crate) fn parse_key(field: Option<&str>) -> Result<Option<i64>, &'static str> {
    match field.map(str::trim).filter(|v| !v.is_empty()) {
        None => Ok(None),
        Some(v) => parse_int(v).map(Some).ok_or("integer"),
    }
}

fn parse_int(v: &str) -> Option<i64> {
    v.parse::<i64>().ok().or_else(|| {
        // Some exports write integers as "123.0".
        let f = v.parse::<f64>().ok()?;
        (f.fract() == 0.0 && f.abs() < 9.0e15).then_some(f as i64)
    })
}

/// Days since 1970-01-01 for `YYYY-MM-DD` (a time after the date is ignored).
pub(crate) fn parse_date(v: &str) -> Option<i32> {
    let date = v.get(..10)?;
    let rest = &v[10..];
    if !(rest.is_empty() || rest.starts_with(' ') || rest.starts_with('T')) {
        return None;
    }
    let mut parts = date.split('-');
    let (y, m, d) = (parts.next()?, parts.next()?, parts.next()?);
    if y.len() != 4 || m.len() != 2 || d.len() != 2 {
        return None;
    }
    let (y, m, d): (i64, i64, i64) = (y.parse().ok()?, m.parse().ok()?, d.parse().ok()?);
    let leap = (y % 4 == 0 && y % 100 != 0) || y % 400 == 0;
    let month_days = [
        31,
        if leap { 29 } else { 28 },
        31,
        30,
        31,
        30,
        31,
        31,
        30,
        31,
        30,
        31,
    ];
    if !(1..=12).contains(&m) || d < 1 || d > month_days[(m - 1) as usize] {
        return None;
    }
    // Days from civil (H. Hinnant's algorithm).
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    i32::try_from(era * 146_097 + doe - 719_468).ok()
}

/// Builds the Arrow array for one column; on a bad value, the line and the expected type.
pub(crate) fn parse_column(
    ty: ColumnType,
    values: ColumnValues<'_>,
) -> Result<ArrayRef, (u64, &'static str)> {
    fn typed<T>(
        values: &ColumnValues<'_>,
        expected: &'static str,
        parse: impl Fn(&str) -> Option<T>,
    ) -> Result<Vec<Option<T>>, (u64, &'static str)> {
        values
            .fields()
            .map(|(line, v)| match v {
                None => Ok(None),
                Some(v) => parse(v).map(Some).ok_or((line, expected)),
            })
            .collect()
    }
    Ok(match ty {
        ColumnType::Int64 => Arc::new(Int64Array::from(typed(&values, "integer", parse_int)?)),
        ColumnType::Float64 => Arc::new(Float64Array::from(typed(&values, "number", |v| {
            v.parse::<f64>().ok().filter(|f| f.is_finite())
        })?)),
        ColumnType::Date32 => Arc::new(Date32Array::from(typed(
            &values,
            "date (YYYY-MM-DD)",
            parse_date,
        )?)),
        ColumnType::Utf8 => Arc::new(StringArray::from(
            values.fields().map(|(_, v)| v).collect::<Vec<_>>(),
        )),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dates_parse_to_days_since_1970() {
        assert_eq!(parse_date("1970-01-01"), Some(0));
        assert_eq!(parse_date("2016-01-01"), Some(16_801));
        assert_eq!(parse_date("2022-07-05"), Some(19_178));
        assert_eq!(parse_date("2020-02-29 00:00:00"), Some(18_321));
        assert_eq!(parse_date("2019-02-29"), None);
        assert_eq!(parse_date("05/07/2022"), None);
        assert_eq!(parse_date("2022-7-5"), None);
    }

    #[test]
    fn integers_accept_a_zero_fraction_only() {
        assert_eq!(parse_key(Some("10000001")), Ok(Some(10_000_001)));
        assert_eq!(parse_key(Some("10000001.0")), Ok(Some(10_000_001)));
        assert_eq!(parse_key(Some("")), Ok(None));
        assert!(parse_key(Some("10.5")).is_err());
        assert!(parse_key(Some("abc")).is_err());
    }
}
