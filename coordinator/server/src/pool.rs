//! Pool-then-protect at the coordinator (issue 17): the members' masked words are added, the
//! canary checked, and the pooled total protected once by `policies`, under the rules every
//! member's policy set. The coordinator never sees one member's numbers.

use trustql_merge::SiteStates;
use trustql_policies::{AnswerProtection, PoolParameters, StateColumn, release_pooled};
use trustql_pool::{Layout, PoolError};
use trustql_protocol::{AnswerMeta, ColumnKind, PooledMeta};

/// The trust code the pooled answer goes by in the merge.
pub(crate) const POOLED_TRUST: &str = "pool";

/// Why the members' words were not released.
#[derive(Debug, thiserror::Error)]
pub(crate) enum PoolFault {
    /// The members' policies disagree on the pool (its members or its protection).
    #[error(
        "the pool's members disagree on the pool ({0}): every member's policy must list the \
         same members and the same [disclosure] protection; nothing was released"
    )]
    Disagree(&'static str),
    /// Masked words that do not add up: a wrong pinned key, or a member's vector missing.
    #[error("{0}")]
    Masks(PoolError),
    /// The pooled total could not be protected.
    #[error("the pooled total could not be protected: {0}")]
    Release(String),
}

/// The protected pooled total, as one answer to merge, and what to tell the researcher.
pub(crate) struct PooledAnswer {
    /// The pooled total, protected.
    pub site: SiteStates,
    /// Notes for the coverage report.
    pub notes: Vec<String>,
}

/// How a member's pooled answer is protected (its pool's parameters say).
pub(crate) fn protection(meta: &PooledMeta) -> AnswerProtection {
    PoolParameters::from_json(&meta.parameters)
        .map(|p| p.protection())
        // Unreadable parameters fail in `combine`; until then, assume the stricter rules.
        .unwrap_or(AnswerProtection::Sdc)
}

/// Adds the members' words and protects the total. `answers` are the pooled answers received;
/// the caller has checked that every member answered.
pub(crate) fn combine(answers: &[&SiteStates]) -> Result<PooledAnswer, PoolFault> {
    let metas: Vec<&PooledMeta> = answers
        .iter()
        .filter_map(|s| s.meta.pool.as_ref())
        .collect();
    let Some(first) = metas.first() else {
        return Err(PoolFault::Disagree("no pooled answer"));
    };
    if metas.len() != answers.len() {
        return Err(PoolFault::Disagree("some members answered without pooling"));
    }
    if metas.iter().any(|m| m.members != first.members) {
        return Err(PoolFault::Disagree("its members"));
    }
    if metas.iter().any(|m| m.parameters != first.parameters) {
        return Err(PoolFault::Disagree("its protection"));
    }
    if metas.iter().any(|m| m.layout != first.layout) {
        return Err(PoolFault::Disagree("the query's cells"));
    }
    let mut answered: Vec<&str> = answers.iter().map(|s| s.trust.as_str()).collect();
    answered.sort_unstable();
    if answered != first.members.iter().map(String::as_str).collect::<Vec<_>>() {
        return Err(PoolFault::Disagree("who answered for it"));
    }
    let vectors: Vec<Vec<u64>> = answers.iter().map(|s| words(s)).collect::<Result<_, _>>()?;
    let length = vectors.first().map_or(0, Vec::len);
    let layout = Layout::new(length.saturating_sub(1)).map_err(PoolFault::Masks)?;
    let sum = layout.unmask(&vectors).map_err(PoolFault::Masks)?;
    let parameters = PoolParameters::from_json(&first.parameters)
        .map_err(|e| PoolFault::Release(e.to_string()))?;
    let released = release_pooled(&parameters, &first.layout, &sum)
        .map_err(|e| PoolFault::Release(e.to_string()))?;
    let meta = AnswerMeta {
        trust: POOLED_TRUST.into(),
        request_id: answers[0].meta.request_id.clone(),
        policy_version: String::new(),
        policy_hash: String::new(),
        released: released.batch.num_rows(),
        columns: released.columns.iter().map(StateColumn::wire).collect(),
        dp: None,
        allowance: None,
        cell_key: parameters.cell_key_meta(),
        pool: None,
    };
    Ok(PooledAnswer {
        site: SiteStates {
            trust: POOLED_TRUST.into(),
            batch: released.batch,
            meta,
        },
        notes: parameters.notes(),
    })
}

/// One member's masked words.
fn words(site: &SiteStates) -> Result<Vec<u64>, PoolFault> {
    let shape = || PoolFault::Disagree("the shape of a member's answer");
    let [column] = site.meta.columns.as_slice() else {
        return Err(shape());
    };
    if column.kind != ColumnKind::Masked || site.batch.num_columns() != 1 {
        return Err(shape());
    }
    let words = site
        .batch
        .column(0)
        .as_any()
        .downcast_ref::<arrow::array::UInt64Array>()
        .ok_or_else(shape)?;
    if arrow::array::Array::null_count(words) > 0 {
        return Err(shape());
    }
    Ok(words.values().to_vec())
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use arrow::array::{RecordBatch, UInt64Array};
    use arrow::datatypes::{DataType, Field, Schema};
    use trustql_protocol::{AnswerColumn, MASKED_COLUMN};

    use super::*;

    fn site(trust: &str, members: &[&str], parameters: &str, words: Vec<u64>) -> SiteStates {
        let schema = Arc::new(Schema::new(vec![Field::new(
            MASKED_COLUMN,
            DataType::UInt64,
            false,
        )]));
        let batch =
            RecordBatch::try_new(schema, vec![Arc::new(UInt64Array::from(words))]).expect("batch");
        SiteStates {
            trust: trust.into(),
            meta: AnswerMeta {
                trust: trust.into(),
                request_id: "r".into(),
                policy_version: "1".into(),
                policy_hash: "h".into(),
                released: batch.num_rows(),
                columns: vec![AnswerColumn {
                    name: MASKED_COLUMN.into(),
                    kind: ColumnKind::Masked,
                    aggregate: None,
                }],
                dp: None,
                allowance: None,
                cell_key: None,
                pool: Some(PooledMeta {
                    members: members.iter().map(|m| m.to_string()).collect(),
                    parameters: parameters.into(),
                    layout: "{}".into(),
                }),
            },
            batch,
        }
    }

    const MEMBERS: [&str; 3] = ["TQ01", "TQ02", "TQ03"];

    fn fault(sites: &[SiteStates]) -> String {
        let refs: Vec<&SiteStates> = sites.iter().collect();
        match combine(&refs) {
            Err(e) => e.to_string(),
            Ok(_) => panic!("released"),
        }
    }

    #[test]
    fn members_that_disagree_release_nothing_and_say_on_what() {
        let agreed = |t| site(t, &MEMBERS, "p", vec![1, 2, 0]);
        let protection = [
            agreed("TQ01"),
            agreed("TQ02"),
            site("TQ03", &MEMBERS, "q", vec![1, 2, 0]),
        ];
        assert!(fault(&protection).contains("its protection"));
        let members = [
            agreed("TQ01"),
            agreed("TQ02"),
            site("TQ03", &["TQ01", "TQ03", "TQ04"], "p", vec![1, 2, 0]),
        ];
        assert!(fault(&members).contains("its members"));
        // A member's answer twice in place of another's.
        let twice = [agreed("TQ01"), agreed("TQ02"), agreed("TQ02")];
        assert!(fault(&twice).contains("who answered"));
        // Words of different lengths.
        let short = [
            agreed("TQ01"),
            agreed("TQ02"),
            site("TQ03", &MEMBERS, "p", vec![1, 0]),
        ];
        assert!(fault(&short).contains("words"), "{}", fault(&short));
        // Words that do not cancel: the canary.
        let garbage = [
            agreed("TQ01"),
            agreed("TQ02"),
            site("TQ03", &MEMBERS, "p", vec![1, 2, 9]),
        ];
        assert!(fault(&garbage).contains("canary"), "{}", fault(&garbage));
    }
}
