//! The runner state machine as a pure function: which message is
//! admitted in which state. Anything else is answered with a rejection that
//! names the message and the state, never a crash.

use ipc::proto::{RunnerState, ToRunner};

/// The name of a node → runner message, for replies and logs.
pub fn request_name(msg: &ToRunner) -> &'static str {
    match msg {
        ToRunner::Connect { .. } => "connect",
        ToRunner::Load => "load",
        ToRunner::WarmUp => "warm_up",
        ToRunner::Task(_) => "task",
    }
}

/// Is `msg` admitted in `state`? The error says why not.
pub fn admit(state: &RunnerState, msg: &ToRunner) -> Result<(), String> {
    let (ok, wanted) = match msg {
        ToRunner::Connect { .. } => (matches!(state, RunnerState::Idle), "idle"),
        ToRunner::Load => (matches!(state, RunnerState::Connected), "connected"),
        ToRunner::WarmUp => (matches!(state, RunnerState::Loaded), "loaded"),
        ToRunner::Task(_) => (
            matches!(state, RunnerState::Ready | RunnerState::Running { .. }),
            "ready or running",
        ),
    };
    if ok {
        Ok(())
    } else {
        Err(format!(
            "{} is accepted only when the runner is {wanted}; it is {}",
            request_name(msg),
            state.name()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ipc::proto::TaskRequest;

    fn task() -> ToRunner {
        ToRunner::Task(TaskRequest::user("t", "x", "p", 1))
    }

    #[test]
    fn each_message_in_its_state_only() {
        let states = [
            RunnerState::Idle,
            RunnerState::Connected,
            RunnerState::Loaded,
            RunnerState::Ready,
            RunnerState::Running { tasks: 1 },
            RunnerState::ShuttingDown,
            RunnerState::Loading { done: 1, total: 2 },
        ];
        let msgs = [
            ToRunner::Connect {
                peers: vec![],
                deadline_ms: 1,
            },
            ToRunner::Load,
            ToRunner::WarmUp,
            task(),
        ];
        let mut admitted = Vec::new();
        for s in &states {
            for m in &msgs {
                if admit(s, m).is_ok() {
                    admitted.push(format!("{}:{}", s.name(), request_name(m)));
                }
            }
        }
        assert_eq!(
            admitted,
            [
                "idle:connect",
                "connected:load",
                "loaded:warm_up",
                "ready:task",
                "running:task"
            ]
        );
    }

    #[test]
    fn rejection_names_message_and_state() {
        let err = admit(&RunnerState::ShuttingDown, &task()).unwrap_err();
        assert_eq!(
            err,
            "task is accepted only when the runner is ready or running; it is shutting_down"
        );
    }
}
