/// Which frames a subflow may receive in which state. The engine asks it what to do with each
/// incoming frame; anything out of place closes that subflow with a reason, and only that subflow.
public struct SubflowStateMachine: Sendable, Equatable {
    public enum State: Sendable, Equatable {
        /// Listener side: waiting for OPEN or JOIN.
        case awaitingHello
        /// Opener side: OPEN sent.
        case awaitingAccept
        /// Opener side: JOIN sent.
        case awaitingJoinAck
        case established
        /// CLOSE sent or received; only the rest of the stream is read.
        case closing
        case closed
    }

    public enum Action: Sendable, Equatable {
        /// OPEN/JOIN (listener) or ACCEPT/JOIN_ACK (opener): the handshake logic decides.
        case handshake(Frame)
        /// DATA, DATA_ACK, DATA_FIN, ADD_ADDR, REMOVE_ADDR, PRIO, PROBE(_ACK): for the session.
        case session(Frame)
        case peerClosed(Frame.Close)
        case peerAborted(Frame.Close)
        case protocolViolation(String)
        case ignore
    }

    public private(set) var state: State

    public static func listenerSide() -> Self { .init(state: .awaitingHello) }
    public static func openerSide(joining: Bool) -> Self { .init(state: joining ? .awaitingJoinAck : .awaitingAccept) }

    public mutating func handshakeCompleted() {
        precondition(state != .established && state != .closed)
        state = .established
    }

    public mutating func closing() { if state != .closed { state = .closing } }
    public mutating func closed() { state = .closed }

    public mutating func receive(_ frame: Frame) -> Action {
        switch (state, frame) {
        case (.closed, _):
            return .ignore
        case (_, .abort(let c)):
            state = .closed
            return .peerAborted(c)
        // A listener with an identity proves it just before its ACCEPT.
        case (.awaitingHello, .open), (.awaitingHello, .join),
             (.awaitingAccept, .identity), (.awaitingAccept, .accept), (.awaitingJoinAck, .joinAck):
            return .handshake(frame)
        case (.established, .close(let c)), (.closing, .close(let c)):
            state = .closing
            return .peerClosed(c)
        case (.established, .open), (.established, .accept), (.established, .join), (.established, .joinAck),
             (.closing, .open), (.closing, .accept), (.closing, .join), (.closing, .joinAck):
            return .protocolViolation("\(frame.type) on an established subflow")
        case (.established, _), (.closing, _):
            return .session(frame)
        default:
            state = .closed
            return .protocolViolation("\(frame.type) before the handshake completed")
        }
    }
}
