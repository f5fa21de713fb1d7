//! A real runner process driven directly over its channel: out-of-state
//! messages get error replies, never a crash; a broken node channel makes it
//! exit by itself; a cancel that overtakes its task still cancels it.

use std::time::Duration;

use ipc::proto::{FromRunner, RunnerState, TaskOutcome, TaskRequest, ToRunner};
use ipc::{ChannelConfig, Control, Incoming, ShutdownMode};
use supervisor::process::{ExitCause, RunnerCommand, SpawnedRunner, Spawner};
use tokio::io::AsyncWriteExt;

use crate::harness::watchdog;

const LIMIT: Duration = Duration::from_secs(10);

async fn spawn_runner(spawner: &Spawner) -> (SpawnedRunner, tokio::net::UnixStream) {
    let (ours, theirs) = std::os::unix::net::UnixStream::pair().unwrap();
    ours.set_nonblocking(true).unwrap();
    let cmd = RunnerCommand {
        program: env!("CARGO_BIN_EXE_shardvisor").into(),
        args: [
            "runner",
            "--instance",
            "i-test",
            "--runner-id",
            "i-test/0",
            "--rank",
            "0",
            "--world-size",
            "1",
            "--engine-config",
            r#"{"scripted": {}}"#,
        ]
        .iter()
        .map(Into::into)
        .collect(),
        env: Vec::new(),
        ipc_fd: theirs.into(),
        lock_fd: None,
        label: "runner i-test/0".into(),
    };
    let spawned = spawner.spawn(cmd).await.unwrap();
    (spawned, tokio::net::UnixStream::from_std(ours).unwrap())
}

async fn next_message(rx: &mut ipc::Receiver<FromRunner>) -> FromRunner {
    loop {
        match watchdog("runner message", LIMIT, rx.recv()).await {
            Incoming::Data(msg) => return msg,
            Incoming::Control(_) => {}
            other => panic!("runner channel ended: {other:?}"),
        }
    }
}

/// The outcome of the next finished task, which must be `id`.
async fn task_done(rx: &mut ipc::Receiver<FromRunner>, id: &str) -> TaskOutcome {
    loop {
        if let FromRunner::TaskDone { task_id, outcome } = next_message(rx).await {
            assert_eq!(task_id, id);
            return outcome;
        }
    }
}

fn task(id: &str) -> ToRunner {
    ToRunner::Task(TaskRequest::user(id, "t", "a b", 2))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn out_of_state_messages_get_error_replies() {
    let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
    let (mut runner, stream) = spawn_runner(&spawner).await;
    let (tx, mut rx) =
        ipc::channel::<ToRunner, FromRunner, _>(stream, ChannelConfig::named("test->runner"));
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Hello { data_addr: None }
    );
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Status(RunnerState::Idle)
    );

    tx.send(ToRunner::Load).await.unwrap();
    match next_message(&mut rx).await {
        FromRunner::Rejected { request, reason } => {
            assert_eq!(request, "load");
            assert_eq!(
                reason,
                "load is accepted only when the runner is connected; it is idle"
            );
        }
        other => panic!("expected a rejection, got {other:?}"),
    }
    tx.send(task("early")).await.unwrap();
    match next_message(&mut rx).await {
        FromRunner::TaskDone {
            task_id,
            outcome: TaskOutcome::Failed { cause, .. },
        } => {
            assert_eq!(task_id, "early");
            assert!(
                cause.contains(
                    "task is accepted only when the runner is ready or running; it is idle"
                ),
                "{cause}"
            );
        }
        other => panic!("expected a failed task, got {other:?}"),
    }
    // The runner is unharmed and proceeds normally.
    tx.send(ToRunner::Connect {
        peers: vec![],
        deadline_ms: 1000,
    })
    .await
    .unwrap();
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Status(RunnerState::Connecting)
    );
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Status(RunnerState::Connected)
    );
    tx.send(ToRunner::Connect {
        peers: vec![],
        deadline_ms: 1000,
    })
    .await
    .unwrap();
    assert!(matches!(
        next_message(&mut rx).await,
        FromRunner::Rejected { .. }
    ));

    // A graceful shutdown from here.
    tx.send_control(Control::Shutdown {
        mode: ShutdownMode::Drain,
        deadline_ms: 1000,
    })
    .await
    .unwrap();
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Status(RunnerState::ShuttingDown)
    );
    match next_message(&mut rx).await {
        FromRunner::Released(released) => {
            assert_eq!(released.len(), 1);
            assert_eq!(released[0].name, "engine");
            assert_eq!(released[0].error, None);
        }
        other => panic!("expected the release report, got {other:?}"),
    }
    assert_eq!(
        next_message(&mut rx).await,
        FromRunner::Status(RunnerState::Shutdown)
    );
    assert!(matches!(
        watchdog("end", LIMIT, rx.recv()).await,
        Incoming::End { .. }
    ));
    tx.close("done").await.unwrap();
    let exit = watchdog("exit", LIMIT, runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Code(0));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn runner_exits_by_itself_when_the_node_channel_breaks() {
    let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
    let (mut runner, mut stream) = spawn_runner(&spawner).await;
    stream
        .write_all(&[
            9, 0, 0, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff,
        ])
        .await
        .unwrap();
    let exit = watchdog("exit", LIMIT, runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Code(2));
}

/// Control frames overtake data: a cancel sent right after its task can
/// reach the runner first. It is kept and applied when the task arrives.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cancel_that_overtakes_its_task_still_cancels_it() {
    let spawner = Spawner::start(tokio::runtime::Handle::current()).unwrap();
    let (mut runner, stream) = spawn_runner(&spawner).await;
    let (tx, mut rx) =
        ipc::channel::<ToRunner, FromRunner, _>(stream, ChannelConfig::named("test->runner"));
    let mut wait_state = async |want: RunnerState| loop {
        if next_message(&mut rx).await == FromRunner::Status(want.clone()) {
            return;
        }
    };
    wait_state(RunnerState::Idle).await;
    tx.send(ToRunner::Connect {
        peers: vec![],
        deadline_ms: 1000,
    })
    .await
    .unwrap();
    wait_state(RunnerState::Connected).await;
    tx.send(ToRunner::Load).await.unwrap();
    wait_state(RunnerState::Loaded).await;
    tx.send(ToRunner::WarmUp).await.unwrap();
    wait_state(RunnerState::Ready).await;

    tx.send_control(Control::Cancel {
        task_id: "overtaken".into(),
    })
    .await
    .unwrap();
    tx.send(task("overtaken")).await.unwrap();
    let outcome = task_done(&mut rx, "overtaken").await;
    assert!(
        matches!(outcome, TaskOutcome::Cancelled { .. }),
        "{outcome:?}"
    );
    // Other tasks are not affected.
    tx.send(task("next")).await.unwrap();
    let outcome = task_done(&mut rx, "next").await;
    assert!(
        matches!(outcome, TaskOutcome::Completed { .. }),
        "{outcome:?}"
    );
    // The node going away: the runner exits by itself.
    drop((tx, rx));
    let exit = watchdog("exit", LIMIT, runner.process.wait()).await;
    assert_eq!(exit, ExitCause::Code(2));
}
