//! The host side of the conversation with the guest agent, and the harvest of outputs.
