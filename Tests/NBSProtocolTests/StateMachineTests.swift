import NIOCore
import Testing

@testable import NBSProtocol

@Suite("Subflow state machine")
struct StateMachineTests {
    enum Start: String, CaseIterable, CustomTestStringConvertible {
        case awaitingHello, awaitingAccept, awaitingJoinAck, establishedListener, establishedOpener, closing, closed

        var machine: SubflowStateMachine {
            switch self {
            case .awaitingHello: return .listenerSide()
            case .awaitingAccept: return .openerSide(joining: false)
            case .awaitingJoinAck: return .openerSide(joining: true)
            case .establishedListener:
                var m = SubflowStateMachine.listenerSide()
                m.handshakeCompleted()
                return m
            case .establishedOpener:
                var m = SubflowStateMachine.openerSide(joining: true)
                m.handshakeCompleted()
                return m
            case .closing:
                var m = SubflowStateMachine.openerSide(joining: false)
                m.handshakeCompleted()
                m.closing()
                return m
            case .closed:
                var m = SubflowStateMachine.listenerSide()
                m.closed()
                return m
            }
        }

        var testDescription: String { rawValue }
    }

    enum Kind: Equatable { case handshake, session, peerClosed, peerAborted, violation, ignore }

    private func kind(_ action: SubflowStateMachine.Action, for frame: Frame) -> Kind {
        switch action {
        case .handshake(let f):
            #expect(f == frame)
            return .handshake
        case .session(let f):
            #expect(f == frame)
            return .session
        case .peerClosed(let c):
            #expect(Frame.close(c) == frame)
            return .peerClosed
        case .peerAborted(let c):
            #expect(Frame.abort(c) == frame)
            return .peerAborted
        case .protocolViolation(let why):
            #expect(why.contains("\(frame.type)"))
            return .violation
        case .ignore:
            return .ignore
        }
    }

    private static let handshakeTypes: Set<FrameType> = [.open, .accept, .join, .joinAck]

    /// What each state must do with each frame type, and the state it must end in (nil: not specified).
    private func expected(_ start: Start, _ type: FrameType) -> (Kind, SubflowStateMachine.State?) {
        if start == .closed { return (.ignore, .closed) }
        if type == .abort { return (.peerAborted, .closed) }
        switch start {
        case .awaitingHello:
            return type == .open || type == .join ? (.handshake, .awaitingHello) : (.violation, .closed)
        case .awaitingAccept:
            // A listener with an identity proves it just before ACCEPT.
            return type == .accept || type == .identity ? (.handshake, .awaitingAccept) : (.violation, .closed)
        case .awaitingJoinAck:
            return type == .joinAck ? (.handshake, .awaitingJoinAck) : (.violation, .closed)
        case .establishedListener, .establishedOpener, .closing:
            if type == .close { return (.peerClosed, .closing) }
            if Self.handshakeTypes.contains(type) { return (.violation, nil) }
            return (.session, start == .closing ? .closing : .established)
        case .closed:
            return (.ignore, .closed)
        }
    }

    @Test("which frames are legal in which state", arguments: Start.allCases, FrameType.allCases)
    func table(start: Start, type: FrameType) {
        for frame in Samples.frames(of: type) {
            var machine = start.machine
            let action = machine.receive(frame)
            let (kind, state) = expected(start, type)
            #expect(self.kind(action, for: frame) == kind, "\(start) + \(type)")
            if let state { #expect(machine.state == state, "\(start) + \(type)") }
        }
    }

    @Test("the handshake completes into established")
    func handshakeCompletes() {
        for start in [Start.awaitingHello, .awaitingAccept, .awaitingJoinAck] {
            var machine = start.machine
            machine.handshakeCompleted()
            #expect(machine.state == .established)
        }
        #expect(SubflowStateMachine.listenerSide().state == .awaitingHello)
        #expect(SubflowStateMachine.openerSide(joining: false).state == .awaitingAccept)
        #expect(SubflowStateMachine.openerSide(joining: true).state == .awaitingJoinAck)
    }

    @Test("closing and closed")
    func closingAndClosed() {
        var machine = Start.establishedListener.machine
        machine.closing()
        #expect(machine.state == .closing)
        machine.closing()
        #expect(machine.state == .closing)
        machine.closed()
        #expect(machine.state == .closed)
        machine.closing()  // a closed subflow does not reopen
        #expect(machine.state == .closed)
    }

    @Test("a whole subflow life: hello, session frames, CLOSE, then nothing")
    func lifecycle() {
        var listener = SubflowStateMachine.listenerSide()
        let open = Samples.frames(of: .open)[0]
        #expect(listener.receive(open) == .handshake(open))
        listener.handshakeCompleted()
        let data = Samples.frames(of: .data)[1]
        #expect(listener.receive(data) == .session(data))
        #expect(listener.receive(open) == .protocolViolation("open on an established subflow"))
        let close = Frame.Close(reason: .normal)
        #expect(listener.receive(.close(close)) == .peerClosed(close))
        #expect(listener.state == .closing)
        // The rest of the stream is still read; a repeated CLOSE is reported again.
        #expect(listener.receive(data) == .session(data))
        #expect(listener.receive(.close(close)) == .peerClosed(close))
        let abort = Frame.Close(reason: .timeout)
        #expect(listener.receive(.abort(abort)) == .peerAborted(abort))
        #expect(listener.state == .closed)
        #expect(listener.receive(data) == .ignore)
        #expect(listener.receive(.abort(abort)) == .ignore)
    }

    @Test("a CLOSE before the handshake completes is a violation; a refusal comes as ABORT")
    func refusal() {
        var opener = SubflowStateMachine.openerSide(joining: false)
        let refusal = Frame.Close(reason: .nameNotServed, message: "not here")
        #expect(opener.receive(.abort(refusal)) == .peerAborted(refusal))
        var opener2 = SubflowStateMachine.openerSide(joining: true)
        if case .protocolViolation = opener2.receive(.close(refusal)) {} else { Issue.record("CLOSE before JOIN_ACK was accepted") }
        #expect(opener2.state == .closed)
    }
}
