//! The release contract without a server: every refusal that decides how an answer may leave
//! (patient key, preview outside DP, dominance with grouping sets, ε bounds, budget), which
//! state is what to the rules, and which totals rules a federation's answers get.

mod common;

use trustql_policies::{
    AnswerProtection, Budget, Moment, Needs, Refusal, Role, Rounding, Rule, StateColumn, Terms,
    TotalsRules,
};

const POLICY: &str = r#"
[policy]
version = "release-1"
trust = "TQ01"

[disclosure]
dominance = { n = 1, k = 60.0 }

[dp]
default_rows_per_patient = 1
bounds = { "sim_av_tumour.age" = [0, 100] }

[[project]]
id = "sdc"
researchers = ["alice"]
tables = ["sim_av_tumour", "sim_sact_cycle"]
expires = "2099-12-31"

[[project]]
id = "dp"
researchers = ["alice"]
tables = ["sim_av_tumour"]
expires = "2099-12-31"
dp = { epsilon_budget = 1.5, epsilon_per_query = 1.0 }
"#;

/// What the release needs for `sql` in `project`, as the node would ask.
async fn needs_for(project: &str, sql: &str, terms: Terms) -> Result<Needs, Refusal> {
    common::needs_for(POLICY, project, sql, terms).await
}

async fn refused(project: &str, sql: &str, terms: Terms) -> Refusal {
    needs_for(project, sql, terms).await.expect_err("refused")
}

const BY_STAGE: &str = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY stage_best";

#[tokio::test]
async fn a_query_without_the_patient_key_is_refused() {
    let r = refused(
        "sdc",
        "SELECT COUNT(*) FROM sim_sact_cycle",
        Terms::default(),
    )
    .await;
    assert_eq!(r.rule, Rule::Unsupported);
    assert!(r.reason.contains("patient key"), "{r}");
}

#[tokio::test]
async fn a_preview_outside_dp_is_refused() {
    let preview = Terms {
        preview: true,
        ..Terms::default()
    };
    let r = refused("sdc", BY_STAGE, preview).await;
    assert!(r.reason.contains("not in differential-privacy mode"), "{r}");
    // In DP mode a preview is what it says.
    match needs_for("dp", BY_STAGE, preview).await {
        Ok(Needs::Dp(dp)) => assert!(dp.preview),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn dominance_is_not_evaluated_on_grouping_sets() {
    let sql = "SELECT stage_best, SUM(age) FROM sim_av_tumour GROUP BY ROLLUP(stage_best)";
    let r = refused("sdc", sql, Terms::default()).await;
    assert!(r.reason.contains("dominance"), "{r}");
    // Without a sum there is nothing for the rule to read, and grouping sets are fine.
    let counts = "SELECT stage_best, COUNT(*) FROM sim_av_tumour GROUP BY ROLLUP(stage_best)";
    assert!(needs_for("sdc", counts, Terms::default()).await.is_ok());
    // With sums the node must bring each patient's contribution to each SUM and AVG.
    let sql = "SELECT stage_best, COUNT(*), SUM(age), AVG(age) FROM sim_av_tumour GROUP BY 1";
    match needs_for("sdc", sql, Terms::default()).await {
        Ok(Needs::Sdc(sdc)) => {
            assert_eq!(sdc.contributions, vec![1, 2]);
            assert_eq!(sdc.top, 1);
        }
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn epsilon_outside_the_projects_bounds_is_refused() {
    for epsilon in [2.0, 0.0, -1.0, f64::NAN, f64::INFINITY] {
        let terms = Terms {
            epsilon: Some(epsilon),
            ..Terms::default()
        };
        let r = refused("dp", BY_STAGE, terms).await;
        assert_eq!(r.rule, Rule::Budget, "{epsilon}");
        assert!(r.reason.contains("at most 1"), "{r}");
    }
    let smaller = Terms {
        epsilon: Some(0.25),
        ..Terms::default()
    };
    match needs_for("dp", BY_STAGE, smaller).await {
        Ok(Needs::Dp(dp)) => assert_eq!(dp.epsilon, 0.25),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn the_budget_refuses_what_it_cannot_pay_and_says_what_is_left() {
    let Ok(Needs::Dp(dp)) = needs_for("dp", BY_STAGE, Terms::default()).await else {
        panic!("a DP query");
    };
    // stage_best has a public code set: every group is released, and no δ is spent.
    assert!(dp.public);
    assert_eq!(dp.delta, 0.0);
    let fresh = Budget::left(&dp.project, 0.0, 0.0);
    assert!(fresh.afford(&dp, "dp", "TQ01").is_ok());
    let after = fresh.after(&dp);
    assert!((after.epsilon - 0.5).abs() < 1e-12);
    let r = after
        .afford(&dp, "dp", "TQ01")
        .expect_err("too little left");
    assert_eq!(r.rule, Rule::Budget);
    assert!(r.reason.contains("ε 0.5000"), "{r}");
    // Spending beyond the budget never leaves a negative remainder.
    assert_eq!(Budget::left(&dp.project, 9.0, 1.0).epsilon, 0.0);
    // A preview costs nothing and is never refused for want of budget.
    let mut preview = (*dp).clone();
    preview.preview = true;
    assert!(
        Budget::left(&dp.project, 1.5, 0.0)
            .afford(&preview, "dp", "TQ01")
            .is_ok()
    );
    assert_eq!(Budget::charge(&preview), (0.0, 0.0));
}

#[tokio::test]
async fn keys_outside_a_public_code_set_spend_delta() {
    let sql = "SELECT age, COUNT(*) FROM sim_av_tumour GROUP BY age";
    match needs_for("dp", sql, Terms::default()).await {
        Ok(Needs::Dp(dp)) => {
            assert!(!dp.public);
            assert!(dp.delta > 0.0);
        }
        other => panic!("{other:?}"),
    }
}

#[test]
fn every_count_a_state_carries_is_a_released_frequency() {
    let state = StateColumn::state;
    assert_eq!(state("c", 0, "COUNT", "count").role(), Role::Count);
    assert_eq!(StateColumn::distinct("d", 0).role(), Role::Count);
    // AVG's count beside an exact SUM would give the exact count a rounded COUNT hides.
    assert_eq!(state("a", 0, "avg", "count").role(), Role::Count);
    assert_eq!(state("a", 0, "avg", "sum").role(), Role::Sum);
    assert_eq!(state("s", 0, "sum", "sum").role(), Role::Sum);
    assert_eq!(
        state("v", 0, "stddev", "count").role(),
        Role::Moment(Moment::Count)
    );
    assert_eq!(state("v", 0, "var", "m2").role(), Role::Moment(Moment::M2));
    assert_eq!(state("m", 0, "max", "max").role(), Role::Other);
    assert_eq!(StateColumn::patients("p").role(), Role::Patients);
    assert_eq!(
        StateColumn::aggregate_patients("q", 0).role(),
        Role::AggregatePatients
    );
}

#[test]
fn totals_rules_apply_unless_every_answer_is_differentially_private() {
    let rules = TotalsRules {
        min_patients: 10,
        rounding: Rounding::Base,
        rounding_base: 5,
    };
    use AnswerProtection::{Dp, Sdc};
    assert_eq!(rules.for_answers([Sdc, Sdc]), rules);
    // Mixed: the SDC trusts' counts still need the rules.
    assert_eq!(rules.for_answers([Dp, Sdc]), rules);
    assert_eq!(rules.for_answers([Sdc, Dp]), rules);
    // All DP: noise is the protection, and no patient count is released to compare.
    assert_eq!(rules.for_answers([Dp, Dp]), TotalsRules::default());
    assert!(!rules.for_answers([Dp]).is_active());
    // No answer at all: the rules stand.
    assert_eq!(rules.for_answers([]), rules);
    assert_eq!(rules.notes().len(), 2);
    assert!(TotalsRules::default().notes().is_empty());
}

#[test]
fn totals_of_cell_key_answers_are_not_rounded_again() {
    let rules = TotalsRules {
        min_patients: 10,
        rounding: Rounding::Base,
        rounding_base: 5,
    };
    use AnswerProtection::{CellKey, Dp, Sdc};
    let unrounded = TotalsRules {
        rounding: Rounding::None,
        ..rules
    };
    // Rounding a sum of perturbed counts would bias it; the minimum still applies.
    assert_eq!(rules.for_answers([CellKey, CellKey]), unrounded);
    assert_eq!(rules.for_answers([CellKey, Dp]), unrounded);
    // A rounded trust's counts still need the rounding.
    assert_eq!(rules.for_answers([CellKey, Sdc]), rules);
}

#[test]
fn totals_rules_that_cannot_be_served_are_refused() {
    let too_high = TotalsRules {
        min_patients: 1001,
        ..TotalsRules::default()
    };
    assert!(
        too_high
            .check()
            .expect_err("too high")
            .contains("at most 1000")
    );
    let no_base = TotalsRules {
        rounding: Rounding::Base,
        rounding_base: 0,
        ..TotalsRules::default()
    };
    assert!(no_base.check().is_err());
    assert!(TotalsRules::default().check().is_ok());
}

#[tokio::test]
async fn an_epsilon_below_the_minimum_is_refused() {
    // The policy's minimum is the default, 0.01: a vanishing ε would buy queries forever.
    for epsilon in [1e-300, f64::MIN_POSITIVE, 1e-9, 0.009] {
        let terms = Terms {
            epsilon: Some(epsilon),
            ..Terms::default()
        };
        let r = refused("dp", BY_STAGE, terms).await;
        assert_eq!(r.rule, Rule::Budget, "{epsilon}");
        assert!(r.reason.contains("from 0.01"), "{r}");
    }
    let least = Terms {
        epsilon: Some(0.01),
        ..Terms::default()
    };
    match needs_for("dp", BY_STAGE, least).await {
        Ok(Needs::Dp(dp)) => assert_eq!(dp.epsilon, 0.01),
        other => panic!("{other:?}"),
    }
}

#[tokio::test]
async fn a_spent_budget_pays_for_no_epsilon_however_small() {
    let Ok(Needs::Dp(dp)) = needs_for("dp", BY_STAGE, Terms::default()).await else {
        panic!("a DP query");
    };
    let spent = Budget::left(&dp.project, 1.5, 0.0);
    for epsilon in [1.0, 0.01, 1e-9, 1e-300] {
        let mut tiny = (*dp).clone();
        tiny.epsilon = epsilon;
        let r = spent
            .afford(&tiny, "dp", "TQ01")
            .expect_err("nothing is left");
        assert_eq!(r.rule, Rule::Budget, "{epsilon}");
    }
    // What rounding leaves over, or overspends, is not a budget: the slack is forgiven once.
    let mut tiny = (*dp).clone();
    tiny.epsilon = 1e-300;
    for spent in [1.5 - 5e-10, 1.5 + 5e-10] {
        let left = Budget::left(&dp.project, spent, 0.0);
        assert!(left.afford(&tiny, "dp", "TQ01").is_err(), "{spent}");
    }
}

#[tokio::test]
async fn repeated_minimum_queries_stop_at_budget_over_minimum() {
    let least = Terms {
        epsilon: Some(0.01),
        ..Terms::default()
    };
    let Ok(Needs::Dp(dp)) = needs_for("dp", BY_STAGE, least).await else {
        panic!("a DP query");
    };
    let mut budget = Budget::left(&dp.project, 0.0, 0.0);
    let mut answered = 0;
    while budget.afford(&dp, "dp", "TQ01").is_ok() {
        budget = budget.after(&dp);
        answered += 1;
        assert!(answered <= 1_000, "the budget never ran out");
    }
    // 1.5 / 0.01, with the floating-point sums' rounding forgiven once, not per query.
    assert_eq!(answered, 150);
}
