"""host/commands"""
