//! The training-health policies, report by report.

use super::*;

fn report(step: u64, loss: f64) -> Report {
    Report {
        step,
        loss: Some(loss),
        loss_scale: None,
        at_ms: step,
    }
}

fn spiky() -> TrainingHealthSpec {
    TrainingHealthSpec {
        spike_factor: 3.0,
        spike_reports: 3,
        median_window: 10,
        ..TrainingHealthSpec::default()
    }
}

#[test]
fn nan_or_inf_loss_is_trouble_at_once() {
    let mut h = VecDeque::new();
    let spec = TrainingHealthSpec::default();
    assert_eq!(observe(&mut h, report(1, 2.0), &spec), None);
    let t = observe(&mut h, report(2, f64::NAN), &spec).expect("NaN");
    assert_eq!(
        (t.kind, t.since_step),
        (crate::kinds::FailureKind::LossNan, 2)
    );
    assert!(t.evidence.contains("loss NaN at step 2"), "{}", t.evidence);
    let t = observe(&mut h, report(3, f64::INFINITY), &spec).expect("inf");
    assert_eq!(t.kind, crate::kinds::FailureKind::LossNan);
    let off = TrainingHealthSpec { nan: false, ..spec };
    assert_eq!(observe(&mut h, report(4, f64::NAN), &off), None);
}

#[test]
fn a_spike_must_last_m_reports_above_k_times_the_median() {
    let mut h = VecDeque::new();
    let spec = spiky();
    for step in 1..=10 {
        assert_eq!(observe(&mut h, report(step, 2.0), &spec), None);
    }
    assert_eq!(
        observe(&mut h, report(11, 9.0), &spec),
        None,
        "one high report"
    );
    assert_eq!(observe(&mut h, report(12, 2.1), &spec), None, "back down");
    assert_eq!(observe(&mut h, report(13, 7.0), &spec), None);
    assert_eq!(observe(&mut h, report(14, 8.0), &spec), None);
    let t = observe(&mut h, report(15, 9.0), &spec).expect("three in a row");
    assert_eq!(
        (t.kind, t.since_step),
        (crate::kinds::FailureKind::LossSpike, 13)
    );
    assert!(t.evidence.contains("median 2.0"), "{}", t.evidence);
    assert!(t.evidence.contains("7@13, 8@14, 9@15"), "{}", t.evidence);
}

#[test]
fn the_spike_policy_is_off_by_default_and_needs_a_baseline() {
    let mut h = VecDeque::new();
    for step in 1..=10 {
        assert_eq!(
            observe(
                &mut h,
                report(step, step as f64 * 100.0),
                &TrainingHealthSpec::default()
            ),
            None
        );
    }
    let mut h = VecDeque::new();
    for step in 1..=3 {
        assert_eq!(
            observe(&mut h, report(step, 50.0), &spiky()),
            None,
            "no baseline yet"
        );
    }
}

#[test]
fn a_loss_scale_stuck_at_its_floor_is_trouble() {
    let spec = TrainingHealthSpec {
        loss_scale_floor: 1.0,
        spike_reports: 2,
        ..TrainingHealthSpec::default()
    };
    let mut h = VecDeque::new();
    let scaled = |step, scale| Report {
        step,
        loss: Some(2.0),
        loss_scale: Some(scale),
        at_ms: step,
    };
    assert_eq!(observe(&mut h, scaled(1, 65536.0), &spec), None);
    assert_eq!(observe(&mut h, scaled(2, 1.0), &spec), None);
    let t = observe(&mut h, scaled(3, 1.0), &spec).expect("two at the floor");
    assert_eq!(
        (t.kind, t.since_step),
        (crate::kinds::FailureKind::LossScaleFloor, 2)
    );
}

#[test]
fn repeated_or_old_steps_are_ignored_and_history_is_bounded() {
    let mut h = VecDeque::new();
    let spec = TrainingHealthSpec::default();
    observe(&mut h, report(5, 2.0), &spec);
    assert_eq!(
        observe(&mut h, report(5, f64::NAN), &spec),
        None,
        "same step again"
    );
    assert_eq!(observe(&mut h, report(4, f64::NAN), &spec), None);
    for step in 6..(6 + MAX_HISTORY as u64 + 10) {
        observe(&mut h, report(step, 2.0), &spec);
    }
    assert_eq!(h.len(), MAX_HISTORY);
}

#[test]
fn specs_are_validated() {
    assert!(TrainingHealthSpec::default().validate().is_ok());
    assert!(spiky().validate().is_ok());
    for bad in [
        TrainingHealthSpec {
            spike_factor: 0.5,
            ..spiky()
        },
        TrainingHealthSpec {
            spike_reports: 0,
            ..spiky()
        },
        TrainingHealthSpec {
            median_window: 1,
            ..spiky()
        },
        TrainingHealthSpec {
            loss_scale_floor: -1.0,
            ..spiky()
        },
    ] {
        assert!(bad.validate().is_err(), "{bad:?}");
    }
}
