//! Fuzz what the coordinator does with an agent's bytes: decode an `AgentMessage` (as tonic
//! would, after the 4 MiB size check), then the same validation the agent service applies.
//! Never a panic; a message that passes is within every limit, and a Register that passes
//! converts into the engine's form.
#![no_main]

use libfuzzer_sys::fuzz_target;
use prost::Message;
use vigil_coordinator::{limits, validate};
use vigil_proto::v1::{AgentMessage, agent_message::Body};

fuzz_target!(|data: &[u8]| {
    if data.len() > limits::MAX_MESSAGE_BYTES {
        return;
    }
    let Ok(msg) = AgentMessage::decode(data) else {
        return;
    };
    if validate::validate(&msg).is_err() {
        return;
    }
    match msg.body {
        Some(Body::Register(reg)) => {
            assert!(limits::valid_node_name(&reg.node_name));
            let r = validate::validate_register(reg, 1, String::new())
                .expect("a Register that validates converts");
            assert!(r.gpus.len() <= limits::MAX_GPUS);
            assert!(r.gpus.windows(2).all(|w| w[0].index < w[1].index));
        }
        Some(Body::Heartbeat(hb)) => {
            assert!(hb.gpus.len() <= limits::MAX_GPUS);
            assert!(hb.workers.len() <= limits::MAX_WORKERS);
        }
        Some(Body::Event(_)) | None => {}
    }
});
