use super::*;

/// A rank waiting for its peers, as `py-spy dump --pid` prints it.
const IN_ALL_REDUCE: &str = r#"Process 4242: /usr/bin/python3 train.py --config big.yaml
Python v3.10.12 (/usr/bin/python3.10)

Thread 4242 (idle): "MainThread"
    all_reduce (torch/distributed/distributed_c10d.py:2050)
    wrapper (torch/distributed/c10d_logger.py:75)
    reduce_gradients (megatron/core/distributed/grad_buffer.py:118)
    train_step (train.py:88)
    <module> (train.py:120)
Thread 4301 (idle): "Thread-1 (_pin_memory_loop)"
    wait (threading.py:324)
    get (queue.py:180)
    _pin_memory_loop (torch/utils/data/_utils/pin_memory.py:52)
    run (threading.py:953)
    _bootstrap_inner (threading.py:1016)
    _bootstrap (threading.py:973)
"#;

/// A rank stuck reading its next batch from a shared file system.
const IN_DATA_LOADER: &str = r#"Process 5151: /usr/bin/python3 train.py --config big.yaml
Python v3.10.12 (/usr/bin/python3.10)

Thread 5151 (active): "MainThread"
    read_shard (data/shards.py:77)
    __getitem__ (data/dataset.py:41)
    fetch (torch/utils/data/_utils/fetch.py:51)
    _next_data (torch/utils/data/dataloader.py:674)
    train_step (train.py:80)
    <module> (train.py:120)
"#;

/// A rank in a barrier, through DeepSpeed, with `--locals` on.
const IN_BARRIER_WITH_LOCALS: &str = r#"Process 777: python3 -u pretrain.py
Python v3.11.4 (/opt/conda/bin/python3.11)

Thread 0x7F2A1C3B4740 (idle): "MainThread"
    barrier (deepspeed/comm/torch.py:402)
        Arguments:
            self: <TorchBackend at 0x7f29e7c3a050>
            group: None
            async_op: False
            device_ids: (0, 1)
    barrier (deepspeed/comm/comm.py:417)
    save_checkpoint (pretrain.py:210)
"#;

/// torchrun's agent: a helper, never a rank.
const TORCHRUN_AGENT: &str = r#"Process 4200: /usr/bin/python3 /usr/local/bin/torchrun --nproc-per-node 8 train.py
Python v3.10.12 (/usr/bin/python3.10)

Thread 4200 (idle): "MainThread"
    _invoke_run (torch/distributed/elastic/agent/server/api.py:835)
    run (torch/distributed/elastic/agent/server/api.py:680)
    launch_agent (torch/distributed/launcher/api.py:255)
    main (torch/distributed/run.py:806)
"#;

/// A data-loader worker process: a helper.
const LOADER_WORKER: &str = r#"Process 4400: /usr/bin/python3 train.py --config big.yaml
Python v3.10.12 (/usr/bin/python3.10)

Thread 4400 (idle): "MainThread"
    poll (multiprocessing/connection.py:424)
    get (multiprocessing/queues.py:113)
    _worker_loop (torch/utils/data/_utils/worker.py:275)
    run (multiprocessing/process.py:108)
"#;

/// With `--native`: the NCCL call under the Python frame.
const NATIVE_NCCL: &str = r#"Process 9: python3 train.py
Python v3.10.12 (/usr/bin/python3.10)

Thread 9 (idle): "MainThread"
    ncclGroupEnd (libnccl.so.2)
    c10d::ProcessGroupNCCL::allreduce (libtorch_cuda.so)
    step (optim.py:31)
"#;

fn process(pid: u32, state: &str, wchan: &str, python_stacks: &str) -> ProcessRecord {
    ProcessRecord {
        pid,
        comm: "python3".into(),
        state: state.into(),
        wchan: wchan.into(),
        kernel_stack: "[<0>] futex_wait_queue+0x60/0x90".into(),
        python_stacks: python_stacks.into(),
    }
}

fn node(processes: Vec<ProcessRecord>) -> NodeEvidence {
    NodeEvidence {
        node: "n1".into(),
        at_ms: 1,
        processes,
        log_tail: String::new(),
        fabric: Vec::new(),
        error: String::new(),
    }
}

fn sleeping(stacks: &str) -> ProcessRecord {
    process(4242, "S (sleeping)", "futex_wait_queue", stacks)
}

#[test]
fn py_spy_frames_are_read_and_other_lines_are_not() {
    assert_eq!(
        frame("    all_reduce (torch/distributed/distributed_c10d.py:2050)"),
        Some(("all_reduce", "torch/distributed/distributed_c10d.py"))
    );
    assert_eq!(
        frame("    ncclGroupEnd (libnccl.so.2)"),
        Some(("ncclGroupEnd", "libnccl.so.2"))
    );
    assert_eq!(frame("Thread 4242 (idle): \"MainThread\""), None);
    assert_eq!(frame("Python v3.10.12 (/usr/bin/python3.10)"), None);
    assert_eq!(frame("            device_ids: (0, 1)"), None, "a local");
    assert_eq!(frame("    x: (0, 1)"), None, "a local, however indented");
    assert_eq!(frame(""), None);
}

#[test]
fn a_rank_in_a_collective_is_read_as_waiting_in_it() {
    let cases = [
        (IN_ALL_REDUCE, "all_reduce"),
        (IN_BARRIER_WITH_LOCALS, "barrier"),
        (NATIVE_NCCL, "ncclGroupEnd"),
    ];
    for (stacks, op) in cases {
        assert_eq!(
            doing(&node(vec![sleeping(stacks)])),
            Doing::Collective(op.into()),
            "{stacks}"
        );
    }
}

#[test]
fn a_rank_elsewhere_is_named_with_its_innermost_frame() {
    assert_eq!(
        doing(&node(vec![process(
            5151,
            "R (running)",
            "0",
            IN_DATA_LOADER
        )])),
        Doing::Elsewhere("pid 5151 in read_shard (data/shards.py)".into())
    );
}

#[test]
fn a_wait_outside_a_communication_library_is_not_a_collective() {
    let stacks = "Thread 1 (idle): \"MainThread\"\n    wait (threading.py:324)\n    join (threading.py:1096)\n";
    assert!(matches!(
        doing(&node(vec![sleeping(stacks)])),
        Doing::Elsewhere(_)
    ));
}

#[test]
fn helpers_are_left_out_and_one_rank_elsewhere_makes_the_node_elsewhere() {
    let all_waiting = node(vec![
        sleeping(TORCHRUN_AGENT),
        sleeping(IN_ALL_REDUCE),
        sleeping(LOADER_WORKER),
    ]);
    assert_eq!(doing(&all_waiting), Doing::Collective("all_reduce".into()));
    let one_elsewhere = node(vec![
        sleeping(TORCHRUN_AGENT),
        sleeping(IN_ALL_REDUCE),
        process(5151, "S (sleeping)", "pipe_read", IN_DATA_LOADER),
    ]);
    assert!(matches!(doing(&one_elsewhere), Doing::Elsewhere(_)));
    let only_helpers = node(vec![sleeping(TORCHRUN_AGENT), sleeping(LOADER_WORKER)]);
    assert_eq!(doing(&only_helpers), Doing::Unknown);
}

#[test]
fn the_kernel_view_tells_uninterruptible_sleep_and_nothing_else() {
    let d_state = node(vec![
        process(10, "S (sleeping)", "futex_wait_queue", ""),
        process(11, "D (disk sleep)", "nfs_wait_bit_killable", ""),
    ]);
    assert_eq!(
        doing(&d_state),
        Doing::Uninterruptible("pid 11 python3, waiting in nfs_wait_bit_killable".into())
    );
    // D state wins over a collective elsewhere in the group: that process is stuck in the kernel.
    let mixed = node(vec![
        sleeping(IN_ALL_REDUCE),
        process(11, "D (disk sleep)", "", ""),
    ]);
    assert!(matches!(doing(&mixed), Doing::Uninterruptible(_)));
    let no_py_spy = node(vec![process(10, "S (sleeping)", "futex_wait_queue", "")]);
    assert_eq!(doing(&no_py_spy), Doing::Unknown);
    let failed_dump = node(vec![sleeping(
        "py-spy dump failed (exit status: 1): Permission denied",
    )]);
    assert_eq!(doing(&failed_dump), Doing::Unknown);
}

#[test]
fn a_node_running_no_worker_says_so() {
    let mut e = node(Vec::new());
    e.error = "no worker of this attempt runs on this node".into();
    assert_eq!(doing(&e), Doing::NoWorker);
    e.error = "the capture task failed: panicked".into();
    assert_eq!(doing(&e), Doing::Unknown);
}

fn names(n: usize) -> Vec<String> {
    (1..=n).map(|i| format!("n{i}")).collect()
}

fn waiting() -> Doing {
    Doing::Collective("all_reduce".into())
}

#[test]
fn the_one_node_not_in_a_collective_is_the_suspect() {
    let nodes = names(4);
    let (w, e) = (
        waiting(),
        Doing::Elsewhere("pid 5151 in read_shard (data/shards.py)".into()),
    );
    let answered = [("n1", &w), ("n2", &w), ("n3", &e), ("n4", &w)];
    assert_eq!(
        odd_one_out(&nodes, &answered, false),
        Some((
            "n3".into(),
            "n3: its workers are not in a collective (pid 5151 in read_shard (data/shards.py)) \
             while n1, n2, n4 wait in all_reduce"
                .into()
        ))
    );
}

#[test]
fn a_node_in_uninterruptible_sleep_or_without_a_worker_is_the_suspect() {
    let nodes = names(2);
    let (w, d, none) = (
        waiting(),
        Doing::Uninterruptible("pid 11 python3, waiting in nfs_wait_bit_killable".into()),
        Doing::NoWorker,
    );
    let (who, why) = odd_one_out(&nodes, &[("n1", &w), ("n2", &d)], false).expect("suspect");
    assert_eq!(who, "n2");
    assert!(why.contains("uninterruptible sleep"), "{why}");
    let (who, why) = odd_one_out(&nodes, &[("n1", &none), ("n2", &w)], false).expect("suspect");
    assert_eq!(who, "n1");
    assert!(why.contains("running no worker"), "{why}");
}

#[test]
fn a_node_that_never_answered_is_the_suspect_only_once_the_attempt_stopped() {
    let nodes = names(3);
    let w = waiting();
    let answered = [("n1", &w), ("n3", &w)];
    assert_eq!(
        odd_one_out(&nodes, &answered, false),
        None,
        "n2 may still answer"
    );
    assert_eq!(
        odd_one_out(&nodes, &answered, true),
        Some((
            "n2".into(),
            "n2: did not answer the capture while n1, n3 wait in all_reduce".into()
        ))
    );
}

#[test]
fn several_odd_nodes_no_collective_or_no_stacks_point_nowhere() {
    let nodes = names(4);
    let (w, e, u) = (waiting(), Doing::Elsewhere("x".into()), Doing::Unknown);
    let two_odd = [("n1", &w), ("n2", &e), ("n3", &e), ("n4", &w)];
    assert_eq!(odd_one_out(&nodes, &two_odd, true), None);
    let none_waiting = [("n1", &e), ("n2", &u), ("n3", &u), ("n4", &u)];
    assert_eq!(odd_one_out(&nodes, &none_waiting, true), None);
    let no_stacks = [("n1", &u), ("n2", &u), ("n3", &u), ("n4", &u)];
    assert_eq!(odd_one_out(&nodes, &no_stacks, true), None);
    let all_waiting = [("n1", &w), ("n2", &w), ("n3", &w), ("n4", &w)];
    assert_eq!(odd_one_out(&nodes, &all_waiting, true), None);
}

#[test]
fn nodes_without_stacks_neither_wait_nor_point() {
    // n2 has no py-spy: it is not counted as waiting, nor as the odd one.
    let nodes = names(3);
    let (w, u, e) = (waiting(), Doing::Unknown, Doing::Elsewhere("x".into()));
    let answered = [("n1", &w), ("n2", &u), ("n3", &e)];
    let (who, why) = odd_one_out(&nodes, &answered, true).expect("suspect");
    assert_eq!(who, "n3");
    assert!(why.ends_with("while n1 wait in all_reduce"), "{why}");
}

#[test]
fn a_long_list_of_waiting_nodes_is_shortened() {
    let nodes = names(10);
    let (w, e) = (waiting(), Doing::Elsewhere("x".into()));
    let answered: Vec<(&str, &Doing)> = nodes
        .iter()
        .map(|n| (n.as_str(), if n == "n7" { &e } else { &w }))
        .collect();
    let (_, why) = odd_one_out(&nodes, &answered, false).expect("suspect");
    assert!(
        why.ends_with("while n1, n2, n3 and 6 more wait in all_reduce"),
        "{why}"
    );
}
